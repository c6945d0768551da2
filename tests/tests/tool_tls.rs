//! `kafka-infer send` and `redrive` through the stunnel TLS front (mutual TLS), with the same
//! KAFKA_SSL_* settings as `run`; without the client certificate they stop with the reason.

use std::time::Duration;

use anyhow::Result;
use kafka_infer_tests::{
    TlsBroker,
    models::{self, KafkaInfer, ToolRun, kafka_infer_tool},
    unique,
};
use serde_json::json;

fn tool(sub: &str, args: &[&str], env: &[(&str, String)]) -> Result<ToolRun> {
    let r = kafka_infer_tool(sub, args, env, None, Duration::from_secs(60))?;
    eprintln!(
        "{sub} {args:?}: exit {:?} in {:?}\n{}{}",
        r.code, r.took, r.stdout, r.stderr
    );
    Ok(r)
}

#[test]
fn send_and_redrive_over_mutual_tls() -> Result<()> {
    let b = TlsBroker::start(true)?;
    let (input, output, error) = (unique("in"), unique("out"), unique("err"));
    for t in [&input, &output, &error] {
        b.broker.create_topic(t, 1)?;
    }
    let model = models::test_model("v2", "m", "echo")?;
    let mut env = b.kafka_env();
    env.extend([
        ("KAFKA_INPUT_TOPIC", input.clone()),
        ("KAFKA_OUTPUT_TOPIC", output.clone()),
        ("KAFKA_ERROR_TOPIC", error.clone()),
        ("KAFKA_INFER_PROTOCOL", "v2".into()),
    ]);
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

    let good = json!({"inputs": [{"name": "x", "shape": [1], "datatype": "FP64", "data": [7.0]}]});
    let r = tool(
        "send",
        &[
            "--json",
            "--timeout",
            "20s",
            &good.to_string(),
            r#"{"value": "not json"}"#,
        ],
        &env,
    )?;
    assert_eq!(r.code, Some(1), "an error record");
    let lines = r.json_lines();
    assert_eq!(lines.len(), 2);
    assert!(lines.iter().any(|l| l["result"] == "ok"));
    assert!(lines.iter().any(|l| l["error_kind"] == "malformed-json"));

    let r = tool("redrive", &["--kind", "malformed-json", "--json"], &env)?;
    assert_eq!(r.code, Some(0));
    let lines = r.json_lines();
    assert_eq!(lines[0]["action"], "copied");
    assert_eq!(lines[1]["summary"]["copied"], 1);

    // Without the client certificate the broker refuses us: exit 1, and the reason.
    let no_cert: Vec<(&str, String)> = env
        .iter()
        .filter(|(k, _)| !k.starts_with("KAFKA_SSL_CLIENT"))
        .cloned()
        .collect();
    for sub in ["send", "redrive"] {
        let args: &[&str] = if sub == "send" {
            &["--timeout", "5s", "{}"]
        } else {
            &["--dry-run"]
        };
        let r = tool(sub, args, &no_cert)?;
        assert_eq!(r.code, Some(1), "{sub}");
        assert!(
            r.stderr.contains("cannot connect to Kafka"),
            "{sub}: {}",
            r.stderr
        );
    }
    Ok(())
}
