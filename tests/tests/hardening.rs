//! What a record can make kafka-infer do to others (issue 19, points 1 and 4), end to end with
//! a real broker and real model servers:
//! - headers: a record's credential and proxy headers (`authorization`, `cookie`,
//!   `x-forwarded-for`) and the underscore spelling of the request id header (`x_request_id`,
//!   which gunicorn, in Seldon's wrapper, reads as `x-request-id`) do not reach the model by
//!   default; a header named in `--forward-headers` does. Seen from the model's side: Seldon's
//!   Python wrapper (Flask under gunicorn) and MLServer (`parameters.headers`).
//! - logs: a burst of records with a `proto-name` holding a newline gives one error record each,
//!   forges no log line, and writes a bounded number of WARN lines (a few in full, then a
//!   summary that counts them by kind).

use std::time::Duration;

use anyhow::{Context, Result};
use bytes::Bytes;
use kafka_infer_tests::{
    Answer, Broker,
    models::{self, KafkaInfer},
    produce_all, read_topic, unique, wait_for,
};
use kafka_io::OutRecord;
use serde_json::{Map, Value};

const SPOOFED_ID: &str = "spoofed-request-id";

/// The headers every record of the header tests carries, besides `idx`.
fn hostile_headers() -> Vec<(String, Bytes)> {
    [
        ("tenant", "t1"),
        ("authorization", "Bearer stolen-token"),
        ("cookie", "session=stolen"),
        ("x-forwarded-for", "10.9.8.7"),
        ("x_request_id", SPOOFED_ID),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), Bytes::from(v)))
    .collect()
}

fn env(broker: &Broker, input: &str, output: &str) -> Vec<(&'static str, String)> {
    vec![
        ("KAFKA_BROKER", broker.bootstrap()),
        ("KAFKA_INPUT_TOPIC", input.to_owned()),
        ("KAFKA_OUTPUT_TOPIC", output.to_owned()),
    ]
}

/// Sends `n` records with [`hostile_headers`] through kafka-infer (`args`, plus
/// `--forward-headers forward` if given) and returns, per record, the headers the model saw
/// (read from its answer by `saw`) and the request id on the output record.
async fn headers_seen(
    args: &[&str],
    forward: Option<&str>,
    request_id_header: &str,
    value: &str,
    saw: fn(&Value) -> Map<String, Value>,
) -> Result<Vec<(Map<String, Value>, String)>> {
    const N: usize = 4;
    let broker = Broker::start()?;
    let (input, output) = (unique("in"), unique("out"));
    broker.create_topic(&input, 1)?;
    broker.create_topic(&output, 1)?;
    let mut args = args.to_vec();
    args.extend(["--session-timeout", "4s"]);
    if let Some(f) = forward {
        args.extend(["--forward-headers", f]);
    }
    let ki = KafkaInfer::start(&args, &env(&broker, &input, &output))?;
    let records = (0..N)
        .map(|i| {
            let mut headers = vec![("idx".to_owned(), Bytes::from(i.to_string()))];
            headers.extend(hostile_headers());
            OutRecord {
                key: None,
                value: Some(Bytes::from(value.to_owned())),
                headers,
            }
        })
        .collect();
    produce_all(broker.settings(), &input, records).await?;
    let answers = read_topic(&broker.bootstrap(), &output, N, 60)?;
    anyhow::ensure!(answers.len() == N, "{} answers of {N}", answers.len());
    let mut out = Vec::new();
    for a in answers {
        anyhow::ensure!(
            !a.headers.contains_key("kafka-infer-error"),
            "an error record: {:?}",
            a.headers
        );
        let v: Value = serde_json::from_slice(&a.value)
            .with_context(|| String::from_utf8_lossy(&a.value).into_owned())?;
        let rid = a
            .headers
            .get(request_id_header)
            .cloned()
            .with_context(|| format!("no {request_id_header} on {:?}", a.headers))?;
        out.push((saw(&v), rid));
    }
    drop(ki);
    Ok(out)
}

/// Seldon's wrapper: `meta.tags.saw`.
fn seldon_saw(v: &Value) -> Map<String, Value> {
    let text = v
        .pointer("/meta/tags/saw")
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("no meta.tags.saw: {v}"));
    serde_json::from_str::<Value>(text)
        .unwrap()
        .as_object()
        .cloned()
        .unwrap()
}

/// MLServer's headers model: the BYTES output `saw`.
fn mlserver_saw(v: &Value) -> Map<String, Value> {
    let out = v["outputs"]
        .as_array()
        .and_then(|o| o.iter().find(|o| o["name"] == "saw"))
        .unwrap_or_else(|| panic!("no output `saw`: {v}"));
    let text = out
        .pointer("/data/0")
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("saw has no string: {v}"));
    serde_json::from_str::<Value>(text)
        .unwrap()
        .as_object()
        .cloned()
        .unwrap()
}

/// Checks what the model saw: `tenant` always; `authorization` and `x-forwarded-for` only
/// when `named`; never `cookie` (not named), never the spoofed request id under any spelling.
fn check(seen: &[(Map<String, Value>, String)], rid_header: &str, named: bool) {
    for (saw, rid) in seen {
        let got = |k: &str| saw.get(k).and_then(Value::as_str);
        assert_eq!(got("tenant"), Some("t1"), "{saw:?}");
        assert_eq!(
            got("authorization"),
            named.then_some("Bearer stolen-token"),
            "{saw:?}"
        );
        assert_eq!(
            got("x-forwarded-for"),
            named.then_some("10.9.8.7"),
            "{saw:?}"
        );
        assert_eq!(got("cookie"), None, "{saw:?}");
        assert!(
            !saw.values()
                .any(|v| v.as_str().is_some_and(|v| v.contains(SPOOFED_ID))),
            "the record's x_request_id reached the model: {saw:?}"
        );
        assert!(!saw.contains_key("x_request_id"), "{saw:?}");
        // The model saw the request id the output record carries.
        assert_eq!(got(rid_header), Some(rid.as_str()), "{saw:?}");
        assert_ne!(rid, SPOOFED_ID);
    }
}

const SELDON_REQUEST: &str = r#"{"data":{"ndarray":[[1.0,2.0]]}}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seldon_wrapper_gets_no_credentials_or_spoofed_request_id_unless_named() -> Result<()> {
    let m = models::seldon("HeadersSeen", "MODEL")?;
    let url = m.rest_url();
    let args = ["--protocol", "seldon", "--model", &url];
    let by_default = headers_seen(&args, None, "Seldon-Puid", SELDON_REQUEST, seldon_saw).await?;
    check(&by_default, "seldon-puid", false);
    // Named: sent (the family pattern names x-forwarded-for); the request id still is ours.
    let named = headers_seen(
        &args,
        Some("*,authorization,x-forwarded-*,x_request_id"),
        "Seldon-Puid",
        SELDON_REQUEST,
        seldon_saw,
    )
    .await?;
    check(&named, "seldon-puid", true);
    Ok(())
}

const V2_REQUEST: &str = r#"{"inputs":[{"name":"x","shape":[1],"datatype":"FP32","data":[1.5]}]}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mlserver_gets_no_credentials_or_spoofed_request_id_unless_named() -> Result<()> {
    let m = models::mlserver()?;
    let url = m.rest_url();
    let args = [
        "--protocol",
        "v2",
        "--model",
        &url,
        "--model-name",
        "headers",
    ];
    let by_default = headers_seen(&args, None, "x-request-id", V2_REQUEST, mlserver_saw).await?;
    check(&by_default, "x-request-id", false);
    let named = headers_seen(
        &args,
        Some("tenant,Authorization,X_Forwarded_For"),
        "x-request-id",
        V2_REQUEST,
        mlserver_saw,
    )
    .await?;
    check(&named, "x-request-id", true);
    Ok(())
}

const FORGED: &str = "FORGED 2026-01-01T00:00:00Z  INFO kafka-infer: stopped cleanly";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_bad_records_forges_no_log_line_and_is_summarised() -> Result<()> {
    const N: usize = 2_000;
    let broker = Broker::start()?;
    let (input, output) = (unique("in"), unique("out"));
    broker.create_topic(&input, 2)?;
    broker.create_topic(&output, 2)?;
    // No model is called: every record fails before (an unknown proto-name).
    let ki = KafkaInfer::start(
        &[
            "--protocol",
            "v2",
            "--model",
            "http://127.0.0.1:9",
            "--session-timeout",
            "4s",
        ],
        &env(&broker, &input, &output),
    )?;
    let proto_name = format!("no.Such\n{FORGED}");
    let records = (0..N)
        .map(|i| OutRecord {
            key: Some(Bytes::from(format!("k{}", i % 7))),
            value: Some(Bytes::from_static(b"\x0a\x01x")),
            headers: vec![
                ("idx".to_owned(), Bytes::from(i.to_string())),
                ("proto-name".to_owned(), Bytes::from(proto_name.clone())),
            ],
        })
        .collect();
    produce_all(broker.settings(), &input, records).await?;

    // Every record got its error record, whose text has the proto-name escaped.
    let answers: Vec<Answer> = read_topic(&broker.bootstrap(), &output, N, 120)?;
    let mut idx: Vec<usize> = answers
        .iter()
        .map(|a| a.headers["idx"].parse().unwrap())
        .collect();
    idx.sort_unstable();
    idx.dedup();
    assert_eq!((answers.len(), idx.len()), (N, N), "one error record each");
    for a in &answers {
        assert_eq!(
            a.headers.get("kafka-infer-error-kind").map(String::as_str),
            Some("unknown-proto-name")
        );
        let text = &a.headers["kafka-infer-error"];
        assert!(
            text.contains(&format!("no.Such\\n{FORGED}")) && !text.contains('\n'),
            "{text}"
        );
        let body = String::from_utf8_lossy(&a.value);
        assert!(
            !body.contains('\n') && body.contains("no.Such\\\\n"),
            "{body}"
        );
    }

    // The summary of what was not logged one by one comes within an interval (10 s).
    let summaries = |log: &str| -> Vec<String> {
        log.lines()
            .filter(|l| l.contains("more records failed in the last"))
            .map(str::to_owned)
            .collect()
    };
    wait_for(Duration::from_secs(30), "the summary line", || {
        let log = ki.output();
        let full = log.lines().filter(|l| l.contains("record failed")).count();
        let held: usize = summaries(&log)
            .iter()
            .filter_map(|l| {
                l.split(" WARN ")
                    .nth(1)?
                    .split(' ')
                    .next()?
                    .parse::<usize>()
                    .ok()
            })
            .sum();
        (full + held == N).then_some(())
    })?;
    let log = ki.output();
    // No line starts with the injected text: it stays inside its WARN line, escaped.
    for line in log.lines() {
        assert!(
            !line.trim_start().starts_with("FORGED"),
            "a forged log line: {line}"
        );
    }
    let full: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("record failed"))
        .collect();
    assert!(
        full.iter()
            .all(|l| l.contains(&format!("no.Such\\n{FORGED}"))),
        "{full:?}"
    );
    let summaries = summaries(&log);
    let warns = log.lines().filter(|l| l.contains(" WARN ")).count();
    // A few lines in full (10 per 10 s interval) and a summary per interval, not one per record.
    assert!(
        (1..=30).contains(&full.len()) && !summaries.is_empty() && warns <= 40,
        "{} full lines, {} summaries, {warns} WARN lines",
        full.len(),
        summaries.len()
    );
    for s in &summaries {
        assert!(s.contains("(unknown-proto-name: "), "{s}");
        assert!(
            s.contains("first partition ") && s.contains(", last partition "),
            "{s}"
        );
    }
    eprintln!(
        "{N} bad records: {warns} WARN lines ({} in full, {} summaries); e.g. {}",
        full.len(),
        summaries.len(),
        summaries[0]
    );
    Ok(())
}
