//! `kafka-infer redrive` (issue 21, point 6) end to end: the binary, a real broker, our test
//! model (v2 echo, `--fail-on`: a body holding one of the texts gets 400) behind `kafka-infer
//! run`, and `kafka-infer send` to fill the topics.
//!
//! A model that refuses "poison" and "cursed" payloads fills the error topic (kind
//! model-rejected), next to a payload that is not JSON (kind malformed-json). Then:
//! - `--dry-run` lists what it would copy and copies nothing;
//! - the model is fixed for "poison" (not "cursed"); `--kind model-rejected` copies those three
//!   only, with value, key and headers as the input had them and kafka-infer's error headers
//!   gone, marked `kafka-infer-redriven: 1`; kafka-infer answers the poison ones;
//! - "cursed" fails again: its new error record keeps the mark, and the next redrive skips it
//!   (--max-redrives 1) and says so. Piped, redrive prints no progress.

use std::time::Duration;

use anyhow::Result;
use kafka_infer_tests::{
    Answer, Broker, free_port,
    models::{self, KafkaInfer, ToolRun, kafka_infer_tool},
    read_topic, unique,
};
use serde_json::{Value, json};

fn request(name: &str, x: f64) -> Value {
    json!({"inputs": [{"name": name, "shape": [1, 1], "datatype": "FP64", "data": [x]}]})
}

fn tool(sub: &str, args: &[&str], env: &[(&str, String)], stdin: Option<&str>) -> Result<ToolRun> {
    let r = kafka_infer_tool(sub, args, env, stdin, Duration::from_secs(60))?;
    eprintln!(
        "{sub} {args:?}: exit {:?} in {:?}\n{}{}",
        r.code, r.took, r.stdout, r.stderr
    );
    Ok(r)
}

fn rid(a: &Answer) -> &str {
    a.headers
        .get("x-request-id")
        .map(String::as_str)
        .unwrap_or_default()
}

#[test]
fn redrive_round_trips_a_poison_batch_after_the_model_is_fixed() -> Result<()> {
    let broker = Broker::start()?;
    let (input, output, error) = (unique("in"), unique("out"), unique("err"));
    broker.create_topic(&input, 2)?;
    broker.create_topic(&output, 2)?;
    broker.create_topic(&error, 1)?;
    let env = vec![
        ("KAFKA_BROKER", broker.bootstrap()),
        ("KAFKA_INPUT_TOPIC", input.clone()),
        ("KAFKA_OUTPUT_TOPIC", output.clone()),
        ("KAFKA_ERROR_TOPIC", error.clone()),
        ("KAFKA_INFER_PROTOCOL", "v2".into()),
    ];
    let ports = (free_port(), free_port());
    let model = models::test_model_with(
        "v2",
        "m",
        &["--fn", "echo", "--fail-on", "poison,cursed"],
        ports,
    )?;
    let url = model.rest_url();
    let group = unique("g");
    let ki = KafkaInfer::start(
        &[
            "--model",
            &url,
            "--model-name",
            "m",
            "--group-id",
            &group,
            "--session-timeout",
            "3s",
            "--retry-max-backoff",
            "200ms",
        ],
        &env,
    )?;
    ki.wait_ready(Duration::from_secs(30))?;

    // Two good requests, three the model refuses, one that is not JSON.
    let requests = [
        json!({"value": request("a", 1.0)}),
        json!({"value": request("poison", 2.0), "key": "kp", "headers": {"tenant": "acme"}}),
        json!({"value": request("poison", 3.0)}),
        json!({"value": request("cursed", 4.0), "key": "kc"}),
        json!({"value": "{not json"}),
        json!({"value": request("b", 5.0)}),
    ];
    let lines: String = requests.iter().map(|r| format!("{r}\n")).collect();
    let r = tool("send", &["--json", "--timeout", "20s"], &env, Some(&lines))?;
    assert_eq!(r.code, Some(1), "error records: exit 1");
    let sent = r.json_lines();
    let by_index = |i: u64| -> &Value {
        sent.iter()
            .find(|l| l["index"] == i)
            .expect("every request reported")
    };
    let kind = |i| by_index(i)["error_kind"].as_str().unwrap_or("").to_owned();
    assert_eq!(
        (1..=6).map(kind).collect::<Vec<_>>(),
        [
            "",
            "model-rejected",
            "model-rejected",
            "model-rejected",
            "malformed-json",
            ""
        ]
    );
    let id = |i| {
        by_index(i)["request_id"]
            .as_str()
            .expect("an id")
            .to_owned()
    };
    let (poison1, poison2, cursed) = (id(2), id(3), id(4));

    // --dry-run: lists the three, copies nothing.
    let r = tool(
        "redrive",
        &["--dry-run", "--kind", "model-rejected", "--json"],
        &env,
        None,
    )?;
    assert_eq!(r.code, Some(0));
    let lines = r.json_lines();
    assert_eq!(lines.len(), 4, "3 rows and the summary");
    assert!(lines[..3].iter().all(|l| l["action"] == "would-copy"));
    let mut listed: Vec<&str> = lines[..3]
        .iter()
        .map(|l| l["request_id"].as_str().unwrap())
        .collect();
    listed.sort();
    let mut expected = [poison1.as_str(), poison2.as_str(), cursed.as_str()];
    expected.sort();
    assert_eq!(listed, expected);
    let s = &lines[3]["summary"];
    assert_eq!(
        (&s["read"], &s["would_copy"], &s["copied"], &s["other_kind"]),
        (&json!(4), &json!(3), &json!(0), &json!(1))
    );
    assert!(r.stderr.is_empty(), "no progress when piped: {}", r.stderr);
    assert_eq!(read_topic(&broker.bootstrap(), &input, 7, 3)?.len(), 6);
    // Where a later run goes on: after the newest error record read.
    let next = s["next_since_ms"].as_i64().expect("next_since_ms");
    assert!(
        next > lines[..3]
            .iter()
            .map(|l| l["timestamp_ms"].as_i64().unwrap())
            .max()
            .unwrap()
    );

    // The model is fixed for "poison", not for "cursed".
    drop(model);
    let _model =
        models::test_model_with("v2", "m", &["--fn", "echo", "--fail-on", "cursed"], ports)?;
    let r = tool("redrive", &["--kind", "model-rejected"], &env, None)?;
    assert_eq!(r.code, Some(0));
    let rows: Vec<&str> = r.stdout.lines().collect();
    assert_eq!(rows.len(), 6, "header, 3 rows, summary, where to go on");
    assert!(
        rows[1..4]
            .iter()
            .all(|l| l.contains("model-rejected") && l.contains("copied to "))
    );
    assert_eq!(
        rows[4],
        format!(
            "copied 3 of 4 error records read from `{error}` to `{input}`; skipped: 1 of other kinds"
        )
    );
    assert!(rows[5].starts_with("to go on after these records next time: --since 20"));
    assert!(r.stderr.is_empty(), "no progress when piped: {}", r.stderr);

    // The copies: the input as it was, marked, without kafka-infer's error headers.
    let all = read_topic(&broker.bootstrap(), &input, 9, 20)?;
    assert_eq!(all.len(), 9);
    let (copies, originals): (Vec<&Answer>, Vec<&Answer>) = all
        .iter()
        .partition(|a| a.headers.contains_key("kafka-infer-redriven"));
    assert_eq!(copies.len(), 3);
    for c in &copies {
        let o = originals
            .iter()
            .find(|o| rid(o) == rid(c))
            .expect("the copy of an input");
        assert_eq!(c.value, o.value);
        assert_eq!(c.key, o.key);
        let mut h = c.headers.clone();
        assert_eq!(h.remove("kafka-infer-redriven").as_deref(), Some("1"));
        assert_eq!(h, o.headers, "headers as the input had them");
        if rid(c) == poison1 {
            assert_eq!(c.key, "kp");
            assert_eq!(h.get("tenant").map(String::as_str), Some("acme"));
        }
    }

    // kafka-infer answers the poison ones now; "cursed" fails again, its mark kept.
    let answers = read_topic(&broker.bootstrap(), &output, 4, 30)?;
    let mut answered: Vec<&str> = answers.iter().map(rid).collect();
    answered.sort();
    let mut want = [id(1), id(6), poison1.clone(), poison2.clone()];
    want.sort();
    assert_eq!(answered, want);
    for a in answers
        .iter()
        .filter(|a| rid(a) == poison1 || rid(a) == poison2)
    {
        assert_eq!(
            a.headers.get("kafka-infer-redriven").map(String::as_str),
            Some("1")
        );
    }
    let errors = read_topic(&broker.bootstrap(), &error, 5, 30)?;
    assert_eq!(errors.len(), 5);
    let again = errors.iter().max_by_key(|e| e.offset).expect("5 records");
    assert_eq!(rid(again), cursed);
    assert_eq!(again.headers["kafka-infer-error-kind"], "model-rejected");
    assert_eq!(again.headers["kafka-infer-redriven"], "1");

    // Redriven once already: skipped, and said so (the next run, from where the first ended).
    let r = tool(
        "redrive",
        &[
            "--kind",
            "model-rejected",
            "--since",
            &next.to_string(),
            "--json",
        ],
        &env,
        None,
    )?;
    assert_eq!(r.code, Some(0));
    let lines = r.json_lines();
    assert_eq!(lines.len(), 2, "1 row and the summary");
    assert_eq!(lines[0]["request_id"], cursed.as_str());
    assert_eq!(lines[0]["action"], "skipped-max-redrives");
    assert_eq!(lines[0]["redriven"], 1);
    assert!(lines[0].get("to_offset").is_none());
    let s = &lines[1]["summary"];
    assert_eq!(
        (&s["copied"], &s["skipped_max_redrives"], &s["outside_time"]),
        (&json!(0), &json!(1), &json!(4))
    );
    let r = tool("redrive", &["--since", &next.to_string()], &env, None)?;
    assert!(
        r.stdout
            .contains("skipped: redriven 1 time already (--max-redrives 1)"),
        "{}",
        r.stdout
    );
    assert_eq!(read_topic(&broker.bootstrap(), &input, 10, 3)?.len(), 9);

    // Without an error topic there is nothing to redrive: a settings error (exit 2).
    let no_error_topic: Vec<(&str, String)> = env
        .iter()
        .filter(|(k, _)| *k != "KAFKA_ERROR_TOPIC")
        .cloned()
        .collect();
    let r = tool("redrive", &[], &no_error_topic, None)?;
    assert_eq!(r.code, Some(2));
    assert!(
        r.stderr.contains("no error topic (KAFKA_ERROR_TOPIC"),
        "{}",
        r.stderr
    );
    drop(ki);
    Ok(())
}
