//! `kafka-infer send` (issue 21, point 3) end to end: the binary, a real broker, our test model
//! (v2 echo) behind `kafka-infer run`.
//!
//! - A good request gets its answer (exit 0, latency printed; --json parses, the answer is the
//!   model's echo, matched by request id); a request given on stdin with a key and a header.
//! - A request that is not JSON gets its error record from the error topic: exit 1, with the
//!   error kind; the good request sent with it is answered.
//! - Nobody serving: exit 1 within --timeout, and an older answer carrying the same request id
//!   (already on the output topic) is not taken for the answer: send reads from the end
//!   offsets taken before it produces.

use std::time::Duration;

use anyhow::Result;
use bytes::Bytes;
use kafka_infer_tests::{
    Broker,
    models::{self, KafkaInfer, ToolRun, kafka_infer_tool},
    unique,
};
use kafka_io::OutRecord;
use serde_json::{Value, json};

struct Topics {
    input: String,
    output: String,
    error: String,
}

fn topics(broker: &Broker) -> Result<Topics> {
    let t = Topics {
        input: unique("in"),
        output: unique("out"),
        error: unique("err"),
    };
    broker.create_topic(&t.input, 2)?;
    broker.create_topic(&t.output, 2)?;
    broker.create_topic(&t.error, 1)?;
    Ok(t)
}

fn env(broker: &Broker, t: &Topics) -> Vec<(&'static str, String)> {
    vec![
        ("KAFKA_BROKER", broker.bootstrap()),
        ("KAFKA_INPUT_TOPIC", t.input.clone()),
        ("KAFKA_OUTPUT_TOPIC", t.output.clone()),
        ("KAFKA_ERROR_TOPIC", t.error.clone()),
        ("KAFKA_INFER_PROTOCOL", "v2".into()),
    ]
}

fn send(args: &[&str], env: &[(&str, String)], stdin: Option<&str>) -> Result<ToolRun> {
    let r = kafka_infer_tool("send", args, env, stdin, Duration::from_secs(60))?;
    eprintln!(
        "send {args:?}: exit {:?} in {:?}\n{}{}",
        r.code, r.took, r.stdout, r.stderr
    );
    Ok(r)
}

fn request(x: f64) -> Value {
    json!({"inputs": [{"name": "x", "shape": [1, 1], "datatype": "FP64", "data": [x]}]})
}

#[test]
fn send_prints_answers_and_error_records() -> Result<()> {
    let broker = Broker::start()?;
    let t = topics(&broker)?;
    let model = models::test_model("v2", "m", "echo")?;
    let env = env(&broker, &t);
    let group = unique("g");
    let ki = KafkaInfer::start(
        &[
            "--model",
            &model.rest_url(),
            "--model-name",
            "m",
            "--group-id",
            &group,
            "--session-timeout",
            "3s",
        ],
        &env,
    )?;
    ki.wait_ready(Duration::from_secs(30))?;

    // One good request, --json: its answer, matched by request id, with a latency.
    let r = send(
        &["--json", "--timeout", "20s", &request(1.5).to_string()],
        &env,
        None,
    )?;
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    let lines = r.json_lines();
    assert_eq!(lines.len(), 1);
    let a = &lines[0];
    assert_eq!(a["result"], "ok");
    assert_eq!(a["topic"], t.output.as_str());
    assert_eq!(a["value"]["outputs"], request(1.5)["inputs"]);
    assert_eq!(a["headers"]["x-request-id"], a["request_id"]);
    let latency = a["latency_ms"].as_f64().expect("a latency");
    assert!(latency > 0.0 && latency < 20_000.0, "{latency}");

    // The table, requests from stdin (JSON lines) with a key and a header of their own.
    let lines = format!(
        "{}\n\n{}\n",
        json!({"value": request(2.0), "key": "k1", "headers": {"tenant": "acme"}}),
        request(3.0)
    );
    let r = send(&["--file", "-", "--timeout", "20s"], &env, Some(&lines))?;
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    let rows: Vec<&str> = r.stdout.lines().collect();
    assert!(
        rows[0].starts_with("#") && rows[0].contains("LATENCY"),
        "{}",
        r.stdout
    );
    assert_eq!(rows.len(), 4, "header, 2 rows, summary: {}", r.stdout);
    for row in &rows[1..3] {
        assert!(row.contains("  ok  ") && row.contains(" ms "), "{row}");
        assert!(row.contains("\"outputs\""), "{row}");
    }
    assert_eq!(rows[3], "2 sent: 2 answered, 0 error records");

    // A request that is not JSON next to a good one: its error record, exit 1.
    let r = send(
        &[
            "--json",
            "--timeout",
            "20s",
            "-H",
            "tenant=acme",
            &request(4.0).to_string(),
            r#"{"value": "{not json"}"#,
        ],
        &env,
        None,
    )?;
    assert_eq!(r.code, Some(1), "{}", r.stderr);
    let lines = r.json_lines();
    assert_eq!(lines.len(), 2);
    let (ok, bad): (Vec<&Value>, Vec<&Value>) = lines.iter().partition(|l| l["result"] == "ok");
    assert_eq!(ok.len(), 1, "{lines:?}");
    assert_eq!(ok[0]["index"], 1);
    assert_eq!(ok[0]["headers"]["tenant"], "acme");
    let bad = bad[0];
    assert_eq!(bad["index"], 2);
    assert_eq!(bad["result"], "error");
    assert_eq!(bad["topic"], t.error.as_str());
    assert_eq!(bad["error_kind"], "malformed-json");
    assert_eq!(bad["value"], "{not json", "the error topic keeps the input");
    assert!(bad["latency_ms"].as_f64().is_some());
    Ok(())
}

#[tokio::test]
async fn send_times_out_when_nobody_answers() -> Result<()> {
    let broker = Broker::start()?;
    let t = topics(&broker)?;
    let env = env(&broker, &t);
    // An answer already on the output topic with the request id we are about to use: from a
    // time before this send, so never its answer.
    kafka_infer_tests::produce_all(
        broker.settings(),
        &t.output,
        vec![OutRecord {
            key: None,
            value: Some(Bytes::from_static(b"{\"outputs\": []}")),
            headers: vec![("x-request-id".into(), Bytes::from_static(b"req-1"))],
        }],
    )
    .await?;
    let r = send(
        &[
            "--timeout",
            "2s",
            "-H",
            "x-request-id=req-1",
            &request(1.0).to_string(),
        ],
        &env,
        None,
    )?;
    assert_eq!(r.code, Some(1), "{}", r.stderr);
    // 2 s of waiting, plus connecting and start-up (a debug build).
    assert!(r.took >= Duration::from_secs(2), "{:?}", r.took);
    assert!(r.took < Duration::from_secs(10), "{:?}", r.took);
    let rows: Vec<&str> = r.stdout.lines().collect();
    assert_eq!(rows.len(), 3, "{}", r.stdout);
    assert!(
        rows[1].contains("req-1") && rows[1].contains("timeout"),
        "{}",
        rows[1]
    );
    assert!(rows[1].contains("no answer within 2s"), "{}", rows[1]);
    assert_eq!(
        rows[2],
        "1 sent: 0 answered, 0 error records, 1 without an answer within 2s"
    );
    // The request did reach the input topic.
    let got = kafka_infer_tests::read_topic(&broker.bootstrap(), &t.input, 1, 10)?;
    assert_eq!(got.len(), 1);
    assert_eq!(
        got[0].headers.get("x-request-id").map(String::as_str),
        Some("req-1")
    );
    Ok(())
}

/// The tools in front of a real model server (MLServer's `doubler`): `check` passes (the model's
/// readiness endpoint included), `run --until-caught-up` answers a backlog and exits 0, `lag
/// --json` then shows nothing left, and `send` gets the doubled answer from a running bridge.
#[tokio::test]
async fn check_until_caught_up_lag_and_send_against_mlserver() -> Result<()> {
    let broker = Broker::start()?;
    let t = topics(&broker)?;
    let ml = models::mlserver()?;
    let mut env = env(&broker, &t);
    env.extend([
        ("KAFKA_GROUP_ID", unique("g")),
        ("KAFKA_INFER_MODEL", ml.rest_url()),
        ("KAFKA_INFER_MODEL_NAME", "doubler".into()),
        ("KAFKA_SESSION_TIMEOUT", "3s".into()),
    ]);
    let tool = |sub: &str, args: &[&str]| -> Result<ToolRun> {
        let r = kafka_infer_tool(sub, args, &env, None, Duration::from_secs(90))?;
        eprintln!(
            "{sub} {args:?}: exit {:?} in {:?}\n{}{}",
            r.code, r.took, r.stdout, r.stderr
        );
        Ok(r)
    };

    let c = tool("check", &["--json"])?;
    assert_eq!(c.code, Some(0), "check against MLServer");
    let v: Value = serde_json::from_str(&c.stdout)?;
    assert_eq!(v["ok"], true, "{v:#}");

    // A backlog of 20 requests, scored as a batch job.
    let backlog = (0..20)
        .map(|i| OutRecord {
            key: Some(Bytes::from(format!("k{i}"))),
            value: Some(Bytes::from(request(i as f64).to_string())),
            headers: vec![],
        })
        .collect();
    kafka_infer_tests::produce_all(broker.settings(), &t.input, backlog).await?;
    let r = tool("run", &["--until-caught-up"])?;
    assert_eq!(r.code, Some(0));
    assert!(r.stdout.contains("caught up: 20 answered"), "{}", r.stdout);

    let l = tool("lag", &["--json"])?;
    assert_eq!(l.code, Some(0));
    let v: Value = serde_json::from_str(&l.stdout)?;
    assert_eq!(v["total_lag"].as_i64(), Some(0), "{v:#}");

    // One request through a running bridge: MLServer's answer, doubled.
    let ki = KafkaInfer::start(&[], &env)?;
    ki.wait_ready(Duration::from_secs(30))?;
    let r = send(
        &["--json", "--timeout", "30s", &request(1.5).to_string()],
        &env,
        None,
    )?;
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    let a = &r.json_lines()[0];
    assert_eq!(a["result"], "ok");
    assert_eq!(a["value"]["model_name"], "doubler");
    assert_eq!(a["value"]["outputs"][0]["data"], json!([3.0]), "{a:#}");
    Ok(())
}
