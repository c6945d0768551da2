//! kafka-infer as a tool (issue 21), end to end with the binary, the test broker and our test
//! model:
//!
//! - `lag`: per-partition committed/end/lag and the oldest unprocessed record's timestamp match
//!   what was produced and committed (committed and end offsets cross-checked with librdkafka's
//!   admin client); `--max-lag` and `--max-lag-age` exit codes.
//! - `check`: passes on a good setup (plaintext and TLS through stunnel); fails naming the step
//!   and the setting for a closed port, a TLS refusal, a missing topic, a model down.
//! - `run --until-caught-up`: two replicas on four partitions both exit 0 with every record
//!   answered exactly once; exit 3 when an error record was written.
//! - `--max-record-age`: old records get `expired` error records (counted), fresh ones answers.
//! - `kafka_infer_consumer_lag_seconds` is present and grows under a backlog.

use std::{
    io::Read,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use kafka_infer_tests::{
    Answer, Broker, Proc, TlsBroker, free_port,
    models::{self, KafkaInfer, kafka_infer_bin},
    py, read_topic, unique, wait_for,
};
use kafka_io::OutRecord;
use serde_json::{Value, json};

/// What a tool invocation gave.
#[derive(Debug)]
struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Out {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}\n{}", self.stdout, self.stderr))
    }
}

/// A kafka-infer started by [`start_tool`], its output being read.
struct Running {
    proc: Proc,
    args: Vec<String>,
    out: std::thread::JoinHandle<String>,
    err: std::thread::JoinHandle<String>,
}

impl Running {
    /// Waits at most `within` for it to exit (else it is stopped and this fails).
    fn finish(mut self, within: Duration) -> Result<Out> {
        let code = match self.proc.wait_exit(within) {
            Ok(c) => c.unwrap_or(-1),
            Err(e) => {
                self.proc.stop();
                bail!("kafka-infer {:?}: {e}", self.args);
            }
        };
        Ok(Out {
            code,
            stdout: self.out.join().expect("reader"),
            stderr: self.err.join().expect("reader"),
        })
    }
}

/// Runs `kafka-infer ARGS` with `env` on a clean KAFKA_* environment, for at most `within`.
fn tool(args: &[&str], env: &[(&str, String)], within: Duration) -> Result<Out> {
    start_tool(args, env)?.finish(within)
}

/// Starts `kafka-infer ARGS` with `env` on a clean KAFKA_* environment.
fn start_tool(args: &[&str], env: &[(&str, String)]) -> Result<Running> {
    let mut cmd = Command::new(kafka_infer_bin());
    cmd.args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
    for (k, _) in std::env::vars() {
        if k.starts_with("KAFKA_") {
            cmd.env_remove(k);
        }
    }
    cmd.env("KAFKA_FETCH_MAX_WAIT", "10ms");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().context("kafka-infer")?;
    let read = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = r.read_to_string(&mut s);
            s
        })
    };
    let out = read(Box::new(child.stdout.take().expect("piped")));
    let err = read(Box::new(child.stderr.take().expect("piped")));
    Ok(Running {
        proc: Proc::from_child("kafka-infer", child),
        args: args.iter().map(|a| a.to_string()).collect(),
        out,
        err,
    })
}

fn env(broker: &str, input: &str, output: &str) -> Vec<(&'static str, String)> {
    vec![
        ("KAFKA_BROKER", broker.to_owned()),
        ("KAFKA_INPUT_TOPIC", input.to_owned()),
        ("KAFKA_OUTPUT_TOPIC", output.to_owned()),
    ]
}

/// A v2 request carrying `id`.
fn request(id: &str) -> Bytes {
    Bytes::from(
        json!({"id": id, "inputs": [{"name": "x", "shape": [1, 1], "datatype": "BYTES", "data": [id]}]})
            .to_string(),
    )
}

async fn produce(broker: &Broker, topic: &str, ids: &[String]) -> Result<()> {
    let records = ids
        .iter()
        .map(|id| OutRecord {
            key: Some(Bytes::from(id.clone())),
            value: Some(request(id)),
            headers: vec![],
        })
        .collect();
    kafka_infer_tests::produce_all(broker.settings(), topic, records).await
}

fn id_of(a: &Answer) -> Option<String> {
    let v: Value = serde_json::from_slice(&a.value).ok()?;
    v["id"].as_str().map(str::to_owned)
}

fn is_error(a: &Answer) -> bool {
    a.headers.contains_key("kafka-infer-error")
}

/// The check rows of `check --json`, by name: (status, detail, setting).
fn checks(v: &Value) -> Vec<(String, String, String, String)> {
    v["checks"]
        .as_array()
        .expect("checks")
        .iter()
        .map(|c| {
            let s = |k: &str| c[k].as_str().unwrap_or_default().to_owned();
            (s("check"), s("status"), s("detail"), s("setting"))
        })
        .collect()
}

fn failed(v: &Value) -> Vec<(String, String, String, String)> {
    checks(v).into_iter().filter(|c| c.1 == "FAIL").collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lag_matches_what_was_produced_and_committed_and_its_limits_set_the_exit_code() -> Result<()>
{
    let broker = Broker::start()?;
    let (input, output, group) = (unique("in"), unique("out"), unique("g"));
    broker.create_topic(&input, 2)?;
    broker.create_topic(&output, 2)?;
    // One record per produce request, so librdkafka's ListOffsets (what KEDA reads) is right on
    // the test broker too, and can cross-check our high watermarks.
    py(
        "produce.py",
        &[&broker.bootstrap(), &input, "none", "12", "1"],
    )?;
    py(
        "commit.py",
        &[&broker.bootstrap(), &group, &input, "0=2", "1=1"],
    )?;
    let produced = read_topic(&broker.bootstrap(), &input, 12, 20)?;
    assert_eq!(produced.len(), 12);
    let admin: Value =
        serde_json::from_str(&py("admin.py", &[&broker.bootstrap(), &group, &input])?)?;
    std::thread::sleep(Duration::from_millis(1200));

    let mut e = env(&broker.bootstrap(), &input, &output);
    e.push(("KAFKA_GROUP_ID", group.clone()));
    e.push(("KAFKA_INFER_MODEL", "http://127.0.0.1:9".into()));
    let out = tool(&["lag", "--json"], &e, Duration::from_secs(60))?;
    assert_eq!(out.code, 0, "{out:?}");
    let v = out.json();
    let mut total = 0;
    for p in v["partitions"].as_array().unwrap() {
        let n = p["partition"].as_i64().unwrap();
        let key = n.to_string();
        let end = produced.iter().filter(|a| a.partition == n).count() as i64;
        assert_eq!(p["end"].as_i64(), Some(end), "partition {n}: {v}");
        assert_eq!(p["end"], admin["end"][&key], "librdkafka's end offset: {v}");
        assert_eq!(p["committed"], admin["committed"][&key], "{v}");
        let committed = p["committed"].as_i64().unwrap();
        assert_eq!(p["lag"].as_i64(), Some(end - committed), "{v}");
        total += end - committed;
        // The oldest unprocessed record is the one at the committed offset.
        let oldest = produced
            .iter()
            .find(|a| a.partition == n && a.offset == committed)
            .expect("the record at the committed offset");
        assert_eq!(
            p["oldest_unprocessed_timestamp_ms"].as_i64(),
            Some(oldest.ts),
            "{v}"
        );
        assert!(
            p["oldest_unprocessed_age_seconds"].as_f64().unwrap() >= 1.0,
            "{v}"
        );
    }
    assert_eq!(v["total_lag"].as_i64(), Some(total));
    assert_eq!(total, 12 - 3);
    assert_eq!(v["group_state"], "Empty", "{v}");

    // Lag never calls the model: it needs no model setting.
    let no_model: Vec<_> = e
        .iter()
        .filter(|(k, _)| *k != "KAFKA_INFER_MODEL")
        .cloned()
        .collect();
    let out = tool(&["lag", "--json"], &no_model, Duration::from_secs(60))?;
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(out.json()["total_lag"].as_i64(), Some(total));

    // The table says the same.
    let out = tool(&["lag"], &e, Duration::from_secs(60))?;
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.contains("TOTAL"), "{}", out.stdout);
    assert!(
        out.stdout
            .lines()
            .any(|l| l.starts_with("TOTAL") && l.contains(&format!(" {total} "))),
        "{}",
        out.stdout
    );

    // Limits: over -> 1, at or under -> 0.
    let lim = |args: &[&str]| -> Result<i32> {
        let mut a = vec!["lag"];
        a.extend_from_slice(args);
        Ok(tool(&a, &e, Duration::from_secs(60))?.code)
    };
    assert_eq!(lim(&["--max-lag", &(total - 1).to_string()])?, 1);
    assert_eq!(lim(&["--max-lag", &total.to_string()])?, 0);
    assert_eq!(lim(&["--max-lag-age", "1h"])?, 0);
    assert_eq!(lim(&["--max-lag-age", "500ms"])?, 1);
    let over = tool(
        &["lag", "--json", "--max-lag", "0"],
        &e,
        Duration::from_secs(60),
    )?;
    assert_eq!(over.code, 1);
    assert!(
        over.json()["over_limits"][0]
            .as_str()
            .unwrap()
            .contains("--max-lag 0"),
        "{over:?}"
    );
    // A broker that is not there: it cannot tell (2), and says why.
    let mut gone = e.clone();
    gone[0].1 = format!("127.0.0.1:{}", free_port());
    let out = tool(&["lag"], &gone, Duration::from_secs(60))?;
    assert_eq!(out.code, 2, "{out:?}");
    assert!(out.stderr.contains("cannot reach broker"), "{out:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_passes_on_a_good_setup_and_names_the_step_and_setting_of_each_fault() -> Result<()> {
    let broker = Broker::start()?;
    let (input, output, errors) = (unique("in"), unique("out"), unique("err"));
    for t in [&input, &output, &errors] {
        broker.create_topic(t, 2)?;
    }
    let model = models::test_model("v2", "m", "echo")?;
    let mut good = env(&broker.bootstrap(), &input, &output);
    good.extend([
        ("KAFKA_ERROR_TOPIC", errors.clone()),
        ("KAFKA_GROUP_ID", unique("g")),
        ("KAFKA_INFER_PROTOCOL", "v2".into()),
        ("KAFKA_INFER_MODEL", model.rest_url()),
        ("KAFKA_INFER_MODEL_NAME", "m".into()),
    ]);
    let out = tool(&["check", "--json"], &good, Duration::from_secs(60))?;
    let v = out.json();
    assert_eq!(out.code, 0, "{v:#}");
    assert_eq!(v["ok"], true);
    let names: Vec<String> = checks(&v).into_iter().map(|c| c.0).collect();
    for want in [
        "configuration",
        &format!("broker {} (bootstrap)", broker.bootstrap()),
        "input topic",
        "output topic",
        "error topic",
        "group",
        "model m",
    ] {
        assert!(names.iter().any(|n| n == want), "{want} checked: {names:?}");
    }
    assert!(checks(&v).iter().all(|c| c.1 == "ok"), "{v:#}");
    // The human table.
    let out = tool(&["check"], &good, Duration::from_secs(60))?;
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.contains("all 7 checks passed"), "{}", out.stdout);

    let with = |k: &'static str, val: String| {
        let mut e = good.clone();
        e.retain(|(n, _)| *n != k);
        e.push((k, val));
        e
    };
    // A closed port: the TCP step, KAFKA_BROKER.
    let port = free_port();
    let out = tool(
        &["check", "--json"],
        &with("KAFKA_BROKER", format!("127.0.0.1:{port}")),
        Duration::from_secs(60),
    )?;
    assert_eq!(out.code, 1, "{out:?}");
    let f = failed(&out.json());
    assert_eq!(f.len(), 1, "{f:?}");
    assert_eq!(f[0].0, format!("broker 127.0.0.1:{port} (bootstrap)"));
    assert!(f[0].2.starts_with("TCP failed"), "{f:?}");
    assert!(f[0].3.contains("KAFKA_BROKER"), "{f:?}");
    // A missing topic: which one, and its setting.
    let out = tool(
        &["check", "--json"],
        &with("KAFKA_OUTPUT_TOPIC", unique("missing")),
        Duration::from_secs(60),
    )?;
    assert_eq!(out.code, 1, "{out:?}");
    let f = failed(&out.json());
    assert_eq!(f.len(), 1, "{f:?}");
    assert_eq!(f[0].0, "output topic");
    assert!(f[0].2.contains("does not exist"), "{f:?}");
    assert!(f[0].3.contains("KAFKA_OUTPUT_TOPIC"), "{f:?}");
    // The model down: its node, its URL and endpoint, the setting.
    let down = format!("http://127.0.0.1:{}", free_port());
    let out = tool(
        &["check", "--json"],
        &with("KAFKA_INFER_MODEL", down.clone()),
        Duration::from_secs(60),
    )?;
    assert_eq!(out.code, 1, "{out:?}");
    let f = failed(&out.json());
    assert_eq!(f.len(), 1, "{f:?}");
    assert_eq!(f[0].0, "model m");
    assert!(
        f[0].2.contains(&down) && f[0].2.contains("/v2/health/ready"),
        "{f:?}"
    );
    assert!(f[0].3.contains("KAFKA_INFER_MODEL"), "{f:?}");
    // A configuration that does not resolve: the one row, naming the setting.
    let out = tool(
        &["check", "--json"],
        &with("KAFKA_INFER_PROTOCOL", "nonsense".into()),
        Duration::from_secs(60),
    )?;
    assert_eq!(out.code, 1, "{out:?}");
    let f = failed(&out.json());
    assert_eq!(f[0].0, "configuration", "{f:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_over_tls_passes_and_names_the_tls_step_when_the_broker_refuses() -> Result<()> {
    let tls = TlsBroker::start(true)?;
    let (input, output) = (unique("in"), unique("out"));
    tls.broker.create_topic(&input, 1)?;
    tls.broker.create_topic(&output, 1)?;
    let model = models::test_model("v2", "m", "echo")?;
    let mut good = tls.kafka_env();
    good.extend([
        ("KAFKA_INPUT_TOPIC", input.clone()),
        ("KAFKA_OUTPUT_TOPIC", output.clone()),
        ("KAFKA_GROUP_ID", unique("g")),
        ("KAFKA_INFER_PROTOCOL", "v2".into()),
        ("KAFKA_INFER_MODEL", model.rest_url()),
        ("KAFKA_INFER_MODEL_NAME", "m".into()),
    ]);
    let out = tool(&["check", "--json"], &good, Duration::from_secs(60))?;
    let v = out.json();
    assert_eq!(out.code, 0, "{v:#}");
    let broker_row = checks(&v)
        .into_iter()
        .find(|c| c.0.starts_with("broker"))
        .unwrap();
    assert_eq!(broker_row.2, "TCP, TLS, ApiVersions: ok", "{v:#}");

    // No client certificate: the broker refuses the handshake.
    let no_cert: Vec<(&str, String)> = good
        .iter()
        .filter(|(k, _)| !k.starts_with("KAFKA_SSL_CLIENT"))
        .cloned()
        .collect();
    let out = tool(&["check", "--json"], &no_cert, Duration::from_secs(60))?;
    assert_eq!(out.code, 1, "{out:?}");
    let f = failed(&out.json());
    assert!(f[0].0.starts_with("broker"), "{f:?}");
    assert!(f[0].2.starts_with("TLS failed"), "{f:?}");
    assert!(f[0].3.contains("KAFKA_SSL_CLIENT_CERT"), "{f:?}");

    // Plaintext against the TLS listener: the first Kafka request fails; the setting to look
    // at is the security protocol.
    let plain: Vec<(&str, String)> = good
        .iter()
        .filter(|(k, _)| !k.starts_with("KAFKA_SSL") && *k != "KAFKA_SECURITY_PROTOCOL")
        .cloned()
        .collect();
    let out = tool(&["check", "--json"], &plain, Duration::from_secs(60))?;
    assert_eq!(out.code, 1, "{out:?}");
    let f = failed(&out.json());
    assert!(f[0].2.starts_with("ApiVersions failed"), "{f:?}");
    assert!(f[0].3.contains("KAFKA_SECURITY_PROTOCOL"), "{f:?}");
    Ok(())
}

/// `run --until-caught-up` with `args`, started now (not waited for).
fn until_caught_up(
    broker: &Broker,
    model: &str,
    input: &str,
    output: &str,
    group: &str,
    extra: &[&str],
) -> Result<Running> {
    let metrics = format!("127.0.0.1:{}", free_port());
    let mut args = vec![
        "run",
        "--until-caught-up",
        "--metrics-addr",
        &metrics,
        "--protocol",
        "v2",
        "--model",
        model,
        "--model-name",
        "m",
        "--group-id",
        group,
        "--session-timeout",
        "3s",
        "--commit-interval",
        "100ms",
    ];
    args.extend_from_slice(extra);
    start_tool(&args, &env(&broker.bootstrap(), input, output))
}

/// The summary line a `run --until-caught-up` printed: (answered, error records).
fn summary(out: &Out) -> Result<(u64, u64)> {
    let line = out
        .stdout
        .lines()
        .rev()
        .find(|l| l.starts_with("caught up: ") || l.starts_with("stopped before catching up: "))
        .with_context(|| format!("no summary in:\n{}", out.stdout))?;
    let num = |after: &str| -> u64 {
        line.split(after)
            .next()
            .unwrap()
            .rsplit(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    Ok((num(" answered"), num(" error records")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_until_caught_up_both_exit_0_with_every_record_answered_once() -> Result<()> {
    let broker = Broker::start()?;
    let (input, output, group) = (unique("in"), unique("out"), unique("g"));
    broker.create_topic(&input, 4)?;
    broker.create_topic(&output, 4)?;
    let ids: Vec<String> = (0..120).map(|i| format!("r{i}")).collect();
    produce(&broker, &input, &ids).await?;
    // 30 records a partition, one at a time, 100 ms each: ~3 s of work per partition, so the
    // second replica joins while the first works and takes partitions over.
    let model = models::test_model_on("v2", "m", "echo", 100, (free_port(), free_port()))?;
    let started = Instant::now();
    let one = ["--max-in-flight", "1"];
    let a = until_caught_up(&broker, &model.rest_url(), &input, &output, &group, &one)?;
    std::thread::sleep(Duration::from_millis(300));
    let b = until_caught_up(&broker, &model.rest_url(), &input, &output, &group, &one)?;
    let a = a.finish(Duration::from_secs(90))?;
    let b = b.finish(Duration::from_secs(30))?;
    let took = started.elapsed();
    let (sa, sb) = (summary(&a)?, summary(&b)?);
    eprintln!(
        "replica a {sa:?} exit {}, replica b {sb:?} exit {}, {took:?}",
        a.code, b.code
    );
    assert_eq!(a.code, 0, "{}", a.stderr);
    assert_eq!(b.code, 0, "{}", b.stderr);
    assert_eq!(sa.0 + sb.0, 120, "each record answered by one replica");
    assert!(
        sa.0 > 0 && sb.0 > 0,
        "both replicas took part: {sa:?} {sb:?}"
    );
    let answers = kafka_infer_tests::read_topic_settled(&broker.bootstrap(), &output, 120, 30)?;
    let mut got: Vec<String> = answers.iter().filter_map(id_of).collect();
    got.sort();
    let mut want = ids.clone();
    want.sort();
    assert_eq!(got, want, "every record answered exactly once");
    assert_eq!(
        kafka_infer_tests::committed_sum(&broker.bootstrap(), &group, &input),
        120,
        "everything committed"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn until_caught_up_exits_3_when_it_wrote_an_error_record_and_stops_at_the_end_offset()
-> Result<()> {
    let broker = Broker::start()?;
    let (input, output, group) = (unique("in"), unique("out"), unique("g"));
    broker.create_topic(&input, 1)?;
    broker.create_topic(&output, 1)?;
    let ids: Vec<String> = (0..5).map(|i| format!("r{i}")).collect();
    produce(&broker, &input, &ids).await?;
    kafka_infer_tests::produce_all(
        broker.settings(),
        &input,
        vec![OutRecord {
            key: None,
            value: Some(Bytes::from_static(b"{not json")),
            headers: vec![],
        }],
    )
    .await?;
    let model = models::test_model("v2", "m", "echo")?;
    let out = until_caught_up(&broker, &model.rest_url(), &input, &output, &group, &[])?
        .finish(Duration::from_secs(60))?;
    assert_eq!(out.code, 3, "error records written: {}", out.stderr);
    assert_eq!(summary(&out)?, (5, 1));
    // Nothing left: a second run exits 0 with nothing done, and leaves later records alone.
    let later: Vec<String> = (0..3).map(|i| format!("later{i}")).collect();
    let again = until_caught_up(&broker, &model.rest_url(), &input, &output, &group, &[])?
        .finish(Duration::from_secs(60))?;
    assert_eq!(again.code, 0, "{}", again.stderr);
    assert_eq!(summary(&again)?, (0, 0));
    produce(&broker, &input, &later).await?;
    let third = until_caught_up(&broker, &model.rest_url(), &input, &output, &group, &[])?
        .finish(Duration::from_secs(60))?;
    assert_eq!(third.code, 0, "{}", third.stderr);
    assert_eq!(summary(&third)?, (3, 0));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn until_caught_up_stopped_by_sigterm_first_exits_4_and_a_rerun_finishes() -> Result<()> {
    let broker = Broker::start()?;
    let (input, output, group) = (unique("in"), unique("out"), unique("g"));
    broker.create_topic(&input, 1)?;
    broker.create_topic(&output, 1)?;
    let ids: Vec<String> = (0..20).map(|i| format!("r{i}")).collect();
    produce(&broker, &input, &ids).await?;
    // 20 records one at a time, 300 ms each: ~6 s of work.
    let model = models::test_model_on("v2", "m", "echo", 300, (free_port(), free_port()))?;
    let url = model.rest_url();
    let one = ["--max-in-flight", "1"];
    let run = until_caught_up(&broker, &url, &input, &output, &group, &one)?;
    std::thread::sleep(Duration::from_millis(3500));
    run.proc.signal("TERM")?;
    let out = run.finish(Duration::from_secs(30))?;
    assert_eq!(out.code, 4, "not caught up: {}", out.stderr);
    assert!(
        out.stdout.contains("stopped before catching up: "),
        "{}",
        out.stdout
    );
    let first = summary(&out)?.0;
    assert!(first > 0 && first < 20, "{first}");
    // What it answered is committed: the rerun does the rest only.
    let rest = until_caught_up(&broker, &url, &input, &output, &group, &[])?
        .finish(Duration::from_secs(60))?;
    assert_eq!(rest.code, 0, "{}", rest.stderr);
    assert_eq!(summary(&rest)?.0, 20 - first);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_record_age_expires_old_records_and_answers_fresh_ones() -> Result<()> {
    let broker = Broker::start()?;
    let (input, output, errors) = (unique("in"), unique("out"), unique("err"));
    broker.create_topic(&input, 1)?;
    broker.create_topic(&output, 1)?;
    broker.create_topic(&errors, 1)?;
    let old: Vec<String> = (0..4).map(|i| format!("old{i}")).collect();
    produce(&broker, &input, &old).await?;
    std::thread::sleep(Duration::from_millis(2500));
    let model = models::test_model("v2", "m", "echo")?;
    let url = model.rest_url();
    let mut e = env(&broker.bootstrap(), &input, &output);
    e.push(("KAFKA_ERROR_TOPIC", errors.clone()));
    e.push(("KAFKA_INFER_MAX_RECORD_AGE", "2s".into()));
    let ki = KafkaInfer::start(
        &[
            "--protocol",
            "v2",
            "--model",
            &url,
            "--model-name",
            "m",
            "--group-id",
            &unique("g"),
            "--session-timeout",
            "3s",
        ],
        &e,
    )?;
    ki.wait_ready(Duration::from_secs(30))?;
    let expired = read_topic(&broker.bootstrap(), &errors, 4, 30)?;
    assert_eq!(expired.len(), 4, "{expired:?}");
    for a in &expired {
        assert_eq!(
            a.headers.get("kafka-infer-error-kind").map(String::as_str),
            Some("expired"),
            "{a:?}"
        );
        assert!(a.headers["kafka-infer-error"].contains("--max-record-age"));
    }
    // The error topic keeps the input as it was (for a replay).
    let mut got: Vec<String> = expired.iter().filter_map(id_of).collect();
    got.sort();
    assert_eq!(got, old);
    let fresh: Vec<String> = (0..4).map(|i| format!("fresh{i}")).collect();
    produce(&broker, &input, &fresh).await?;
    let answers = read_topic(&broker.bootstrap(), &output, 4, 30)?;
    assert!(answers.iter().all(|a| !is_error(a)), "{answers:?}");
    let mut got: Vec<String> = answers.iter().filter_map(id_of).collect();
    got.sort();
    assert_eq!(got, fresh);
    wait_for(Duration::from_secs(10), "expired counted", || {
        (ki.metric("kafka_infer_records_total{result=\"expired\"}") == Some(4.0)).then_some(())
    })?;
    assert_eq!(
        ki.metric("kafka_infer_records_total{result=\"ok\"}"),
        Some(4.0)
    );
    assert_eq!(
        ki.metric("kafka_infer_records_total{result=\"error\"}"),
        Some(0.0)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lag_seconds_gauge_grows_under_a_backlog() -> Result<()> {
    let broker = Broker::start()?;
    let (input, output) = (unique("in"), unique("out"));
    broker.create_topic(&input, 1)?;
    broker.create_topic(&output, 1)?;
    // One call at a time, 300 ms each: 15 records take ~4.5 s.
    let model = models::test_model_on("v2", "m", "echo", 300, (free_port(), free_port()))?;
    let group = unique("g");
    let ki = KafkaInfer::start(
        &[
            "--protocol",
            "v2",
            "--model",
            &model.rest_url(),
            "--model-name",
            "m",
            "--group-id",
            &group,
            "--session-timeout",
            "3s",
            "--max-in-flight",
            "1",
        ],
        &env(&broker.bootstrap(), &input, &output),
    )?;
    ki.wait_ready(Duration::from_secs(30))?;
    let series = format!("kafka_infer_consumer_lag_seconds{{topic=\"{input}\",partition=\"0\"}}");
    let idle = wait_for(Duration::from_secs(20), "the lag-seconds series", || {
        ki.metric(&series)
    })?;
    assert_eq!(idle, 0.0, "no backlog, no age");
    let ids: Vec<String> = (0..15).map(|i| format!("r{i}")).collect();
    produce(&broker, &input, &ids).await?;
    let age = wait_for(Duration::from_secs(10), "lag seconds above 1", || {
        ki.metric(&series).filter(|a| *a > 1.0)
    })?;
    eprintln!("kafka_infer_consumer_lag_seconds under backlog: {age}");
    assert!(ki.metric("kafka_infer_consumer_lag{").unwrap_or(0.0) > 0.0);
    // `lag` sees the running member and its backlog in time too.
    let mut e = env(&broker.bootstrap(), &input, &output);
    e.extend([
        ("KAFKA_GROUP_ID", group.clone()),
        ("KAFKA_INFER_MODEL", model.rest_url()),
    ]);
    let v = tool(&["lag", "--json"], &e, Duration::from_secs(60))?.json();
    assert_eq!(v["group_state"], "Stable", "{v:#}");
    let members = v["members"].as_array().unwrap();
    assert_eq!(members.len(), 1, "{v:#}");
    assert!(
        members[0]["member_id"]
            .as_str()
            .unwrap()
            .starts_with("kafka-infer-"),
        "{v:#}"
    );
    assert!(v["total_lag"].as_i64().unwrap() > 0, "{v:#}");
    assert!(v["max_age_seconds"].as_f64().unwrap() > 1.0, "{v:#}");
    // Once the backlog is done, back to 0.
    read_topic(&broker.bootstrap(), &output, 15, 30)?;
    wait_for(Duration::from_secs(10), "lag seconds back to 0", || {
        (ki.metric(&series) == Some(0.0)).then_some(())
    })?;
    Ok(())
}
