//! Seldon inference graphs end to end, over REST and gRPC, with Seldon's Python wrapper as every
//! node: each answer is checked against what Seldon's executor (v1.18) would answer, worked out
//! here from its semantics (docs/notes-seldon-executor.md):
//! - a node makes its input call (transform-input, or predict for a MODEL), then its children
//!   (route -1: all of them, the first child's answer kept; -2: its input back unchanged; n:
//!   child n), then aggregates (a COMBINER) and makes its transform-output call;
//! - RANDOM_ABTEST picks child 0 with probability ratioA;
//! - SELDON_ENABLE_ROUTING_INJECTION writes each node's route into meta.routing;
//! - every record header goes to every node, with `Seldon-Puid` (the record's, or a new one)
//!   and the record's trace context continued.
//!
//! Records carry rows [x, r]: transformer t adds 1 to x, model a doubles it, model b triples it,
//! output transformer o takes 5 off, router r picks branch r, combiner c sums the children's x.

use std::{collections::BTreeMap, time::Duration};

use anyhow::Result;
use bytes::Bytes;
use kafka_infer_tests::{
    Answer, Broker, Proc, free_port,
    models::{self, KafkaInfer, Server},
    python, read_topic, repo_root, unique, wait_for, wait_port,
};
use kafka_infer_tests::{kafka_env, produce_all, seldon_deployment};
use kafka_io::OutRecord;
use serde_json::{Value, json};

/// Seldon wrapper processes: `x` plays t, r, o and c (role-free methods), `a` and `b` the models.
struct Nodes {
    x: Server,
    a: Server,
    b: Server,
}

impl Nodes {
    fn start() -> Result<Self> {
        let node = |role| models::seldon_with_env("GraphNode", "MODEL", &[("NODE_ROLE", role)]);
        Ok(Self {
            x: node("x")?,
            a: node("a")?,
            b: node("b")?,
        })
    }
}

/// An endpoint as the operator writes it: httpPort and grpcPort (service_port is not used for
/// calls by Seldon's executor).
fn endpoint(s: &Server) -> String {
    format!("{{httpPort: {}, grpcPort: {}}}", s.http_port, s.grpc_port)
}

fn deployment(transport: &str, broker: &Broker, input: &str, output: &str, graph: &str) -> String {
    let mut env = kafka_env(broker, input, output);
    env.push(("SELDON_ENABLE_ROUTING_INJECTION", "true".into()));
    seldon_deployment("seldon", transport, &env, graph)
}

/// One record: x, r, and its headers.
struct Rec {
    x: f64,
    r: i64,
    headers: Vec<(String, String)>,
}

fn trace_id(i: usize) -> String {
    format!("{:032x}", 0xabc0_0000_u64 + i as u64)
}

const INPUT_SPAN: &str = "00f067aa0ba902b7";

/// Records i = 0..n: x = i, r = routes[i % len]; every record has `tenant`; even ones a
/// Seldon-Puid; every fourth a traceparent.
fn records(n: usize, routes: &[i64]) -> Vec<Rec> {
    (0..n)
        .map(|i| {
            let mut headers = vec![
                ("idx".to_string(), i.to_string()),
                ("tenant".to_string(), format!("t{i}")),
            ];
            if i % 2 == 0 {
                headers.push(("Seldon-Puid".into(), format!("p{i}")));
            }
            if i % 4 == 0 {
                headers.push((
                    "traceparent".into(),
                    format!("00-{}-{INPUT_SPAN}-01", trace_id(i)),
                ));
            }
            Rec {
                x: i as f64,
                r: routes[i % routes.len()],
                headers,
            }
        })
        .collect()
}

/// Runs `recs` through kafka-infer serving `graph`; answers by record index, as JSON.
async fn run(transport: &str, graph: &str, recs: &[Rec]) -> Result<Vec<(Answer, Value)>> {
    run_with(transport, graph, recs, &[], &[]).await
}

/// [`run`] with extra kafka-infer flags and environment; kafka-infer has stopped (SIGTERM) when
/// it returns.
async fn run_with(
    transport: &str,
    graph: &str,
    recs: &[Rec],
    extra: &[&str],
    env: &[(&str, String)],
) -> Result<Vec<(Answer, Value)>> {
    let broker = Broker::start()?;
    let (input, output) = (unique("in"), unique("out"));
    broker.create_topic(&input, 2)?;
    broker.create_topic(&output, 2)?;
    let dir = tempfile::tempdir()?;
    let yaml = dir.path().join("sdep.yaml");
    std::fs::write(
        &yaml,
        deployment(transport, &broker, &input, &output, graph),
    )?;
    let mut args = vec!["-f", yaml.to_str().unwrap(), "--session-timeout", "4s"];
    args.extend_from_slice(extra);
    let ki = KafkaInfer::start(&args, env)?;
    let records = recs
        .iter()
        .enumerate()
        .map(|(i, r)| OutRecord {
            key: Some(Bytes::from(format!("k{}", i % 3))),
            value: Some(Bytes::from(
                json!({"data": {"ndarray": [[r.x, r.r]]}}).to_string(),
            )),
            headers: r
                .headers
                .iter()
                .map(|(k, v)| (k.clone(), Bytes::from(v.clone())))
                .collect(),
        })
        .collect();
    produce_all(broker.settings(), &input, records).await?;
    let answers = read_topic(&broker.bootstrap(), &output, recs.len(), 60)?;
    assert_eq!(answers.len(), recs.len(), "every record answered once");
    let mut by_idx: Vec<Option<(Answer, Value)>> = (0..recs.len()).map(|_| None).collect();
    for a in answers {
        let i: usize = a.headers["idx"].parse()?;
        let v: Value = serde_json::from_slice(&a.value)?;
        assert!(by_idx[i].is_none(), "record {i} answered twice");
        by_idx[i] = Some((a, v));
    }
    let errors = ki
        .metric("kafka_infer_records_total{result=\"error\"}")
        .unwrap_or(0.0);
    assert_eq!(errors, 0.0, "no error records");
    drop(ki);
    Ok(by_idx.into_iter().map(Option::unwrap).collect())
}

fn row(v: &Value) -> (f64, i64) {
    let r = &v["data"]["ndarray"][0];
    (
        r[0].as_f64().unwrap_or_else(|| panic!("no x in {v}")),
        r[1].as_f64().unwrap_or_else(|| panic!("no r in {v}")) as i64,
    )
}

fn routing(pairs: &[(&str, i64)]) -> Value {
    Value::Object(
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), json!(v)))
            .collect(),
    )
}

/// TRANSFORMER t -> ROUTER r -> {MODEL a, MODEL b}, under OUTPUT_TRANSFORMER o; routes 0, 1,
/// -1 and -2; headers, request ids and trace context checked on the model side (REST: the
/// wrapper's Flask request) and on the output record.
async fn router_graph(transport: &str) -> Result<()> {
    let n = Nodes::start()?;
    let graph = format!(
        "name: o
type: OUTPUT_TRANSFORMER
endpoint: {x}
children:
- name: t
  type: TRANSFORMER
  endpoint: {x}
  children:
  - name: r
    type: ROUTER
    endpoint: {x}
    children:
    - {{name: a, type: MODEL, endpoint: {a}}}
    - {{name: b, type: MODEL, endpoint: {b}}}",
        x = endpoint(&n.x),
        a = endpoint(&n.a),
        b = endpoint(&n.b)
    );
    let recs = records(16, &[0, 1, -1, -2]);
    let answers = run(transport, &graph, &recs).await?;
    let rest = transport == "rest";
    for (i, (rec, (a, v))) in recs.iter().zip(&answers).enumerate() {
        let x1 = rec.x + 1.0;
        let (want, model, route_map) = match rec.r {
            0 => (
                2.0 * x1,
                Some("a"),
                vec![("o", -1), ("t", -1), ("r", 0), ("a", -1)],
            ),
            1 => (
                3.0 * x1,
                Some("b"),
                vec![("o", -1), ("t", -1), ("r", 1), ("b", -1)],
            ),
            // All children; the first one's answer is kept.
            -1 => (
                2.0 * x1,
                Some("a"),
                vec![("o", -1), ("t", -1), ("r", -1), ("a", -1), ("b", -1)],
            ),
            // The router's input comes back unchanged (transform-output still runs).
            -2 => (x1, None, vec![("o", -1), ("t", -1), ("r", -2)]),
            _ => unreachable!(),
        };
        assert_eq!(
            row(v),
            (want - 5.0, rec.r),
            "record {i} (r = {}): {v}",
            rec.r
        );
        // meta.routing where the answer has a meta object (Seldon injects only there).
        if let Some(r) = v.pointer("/meta/routing") {
            assert_eq!(r, &routing(&route_map), "record {i}: routing");
        } else {
            assert!(!rest || model.is_none(), "record {i}: no meta.routing: {v}");
        }
        // The request id: the record's Seldon-Puid, else a new one; on the output record.
        let puid = a
            .headers
            .get("Seldon-Puid")
            .expect("Seldon-Puid on the answer");
        if i % 2 == 0 {
            assert_eq!(puid, &format!("p{i}"));
        } else {
            assert_eq!(puid.len(), 36, "a generated uuid: {puid}");
        }
        assert_eq!(a.headers["tenant"], format!("t{i}"), "headers kept");
        // Trace context continued: same trace, our span as parent.
        if i % 4 == 0 {
            let tp = &a.headers["traceparent"];
            assert!(tp.starts_with(&format!("00-{}-", trace_id(i))), "{tp}");
            assert!(!tp.contains(INPUT_SPAN), "a new parent span: {tp}");
        } else {
            assert!(!a.headers.contains_key("traceparent"));
        }
        // What the model saw (REST: the wrapper's request headers, in meta.tags).
        if let (true, Some(m)) = (rest, model) {
            let tags = &v["meta"]["tags"];
            assert_eq!(tags[format!("{m}_saw_seldon-puid")], json!(puid), "{v}");
            assert_eq!(
                tags[format!("{m}_saw_tenant")],
                json!(format!("t{i}")),
                "{v}"
            );
            if i % 4 == 0 {
                assert_eq!(
                    tags[format!("{m}_saw_traceparent")],
                    json!(a.headers["traceparent"]),
                    "the model and the output record share our span"
                );
            }
        }
    }
    Ok(())
}

/// COMBINER c over {a, b}; RANDOM_ABTEST over {a, b} with ratioA 0.5, 1 and 0; a node with no
/// type and methods [TRANSFORM_INPUT, TRANSFORM_OUTPUT].
async fn combiner_abtest_methods(transport: &str) -> Result<()> {
    let n = Nodes::start()?;
    let (x, a, b) = (endpoint(&n.x), endpoint(&n.a), endpoint(&n.b));
    let children = format!(
        "children:
- {{name: a, type: MODEL, endpoint: {a}}}
- {{name: b, type: MODEL, endpoint: {b}}}"
    );
    // The combiner sums the children's x: 2x + 3x.
    let recs = records(6, &[0]);
    let combined = run(
        transport,
        &format!("name: c\ntype: COMBINER\nendpoint: {x}\n{children}"),
        &recs,
    )
    .await?;
    for (rec, (_, v)) in recs.iter().zip(&combined) {
        assert_eq!(row(v).0, 5.0 * rec.x, "combined: {v}");
    }
    // Methods on an untyped node: transform-input, its child, transform-output.
    let methods = run(
        transport,
        &format!(
            "name: m\ntype: UNKNOWN_TYPE\nmethods: [TRANSFORM_INPUT, TRANSFORM_OUTPUT]\n\
             endpoint: {x}\nchildren:\n- {{name: a, type: MODEL, endpoint: {a}}}"
        ),
        &recs,
    )
    .await?;
    for (rec, (_, v)) in recs.iter().zip(&methods) {
        assert_eq!(row(v).0, 2.0 * (rec.x + 1.0) - 5.0, "methods: {v}");
    }
    // RANDOM_ABTEST: no endpoint; ratioA is child 0's share.
    for (ratio, want_a, want_b) in [("1", true, false), ("0", false, true), ("0.5", true, true)] {
        let recs = records(24, &[0]);
        let answers = run(
            transport,
            &format!(
                "name: ab\nimplementation: RANDOM_ABTEST\nparameters:\n\
                 - {{name: ratioA, value: \"{ratio}\", type: FLOAT}}\n{children}"
            ),
            &recs,
        )
        .await?;
        let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
        for (rec, (_, v)) in recs.iter().zip(&answers) {
            let got = row(v).0;
            let (branch, model) = if rec.x == 0.0 {
                continue; // 0 both ways
            } else if got == 2.0 * rec.x {
                (0, "a")
            } else if got == 3.0 * rec.x {
                (1, "b")
            } else {
                panic!("ab answer {got} for x = {}", rec.x)
            };
            *seen.entry(model).or_default() += 1;
            if let Some(r) = v.pointer("/meta/routing/ab") {
                assert_eq!(r, &json!(branch), "meta.routing.ab matches the branch: {v}");
            }
        }
        assert_eq!(seen.contains_key("a"), want_a, "ratioA {ratio}: {seen:?}");
        assert_eq!(seen.contains_key("b"), want_b, "ratioA {ratio}: {seen:?}");
    }
    Ok(())
}

/// With OTLP export on, each record is a span (the child of the record's traceparent, or a new
/// trace) with a child span per model call; the model sees the call's span as parent and the
/// output record the record's span.
#[tokio::test(flavor = "multi_thread")]
async fn spans_are_exported_over_otlp() -> Result<()> {
    let model = models::seldon_with_env("GraphNode", "MODEL", &[("NODE_ROLE", "a")])?;
    let dir = tempfile::tempdir()?;
    let events = dir.path().join("spans.jsonl");
    let port = free_port();
    let _collector = Proc::spawn(
        "otlp-sink",
        std::process::Command::new(python())
            .arg(repo_root().join("tests/py/sink.py"))
            .arg(port.to_string())
            .arg(&events),
    )?;
    wait_port(port, Duration::from_secs(20))?;
    let graph = format!("name: a\ntype: MODEL\nendpoint: {}", endpoint(&model));
    let recs = records(4, &[0]);
    let endpoint = format!("http://127.0.0.1:{port}");
    let answers = run_with(
        "rest",
        &graph,
        &recs,
        &["--otlp-endpoint", &endpoint],
        &[("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json".into())],
    )
    .await?;
    // kafka-infer has stopped, flushing its spans.
    let text = std::fs::read_to_string(&events).unwrap_or_default();
    let mut spans: Vec<Value> = Vec::new();
    for line in text.lines() {
        let e: Value = serde_json::from_str(line)?;
        assert!(e["headers"]["content-type"] == "application/json", "{e}");
        let body: Value = serde_json::from_str(e["body"].as_str().unwrap())?;
        for rs in body["resourceSpans"].as_array().into_iter().flatten() {
            for ss in rs["scopeSpans"].as_array().into_iter().flatten() {
                spans.extend(ss["spans"].as_array().into_iter().flatten().cloned());
            }
        }
    }
    assert_eq!(
        spans.len(),
        8,
        "a record span and a call span per record: {text}"
    );
    for (i, (a, v)) in answers.iter().enumerate() {
        let tp = a
            .headers
            .get("traceparent")
            .expect("every record is traced");
        let parts: Vec<&str> = tp.split('-').collect();
        let (trace, record_span) = (parts[1], parts[2]);
        if i % 4 == 0 {
            assert_eq!(trace, trace_id(i), "the record's own trace continued");
        }
        let rec_span = spans
            .iter()
            .find(|s| s["spanId"] == json!(record_span))
            .unwrap_or_else(|| panic!("record {i}: span {record_span} exported: {spans:?}"));
        assert_eq!(rec_span["traceId"], json!(trace));
        let want_parent = if i % 4 == 0 {
            json!(INPUT_SPAN)
        } else {
            json!("")
        };
        assert_eq!(rec_span["parentSpanId"], want_parent, "{rec_span}");
        let call = spans
            .iter()
            .find(|s| s["parentSpanId"] == json!(record_span))
            .unwrap_or_else(|| panic!("record {i}: a call span under {record_span}"));
        assert_eq!(call["name"], "a predict");
        let saw = v["meta"]["tags"]["a_saw_traceparent"]
            .as_str()
            .unwrap_or_default();
        assert_eq!(
            saw,
            format!("00-{trace}-{}-01", call["spanId"].as_str().unwrap()),
            "the model's parent is the call span"
        );
    }
    Ok(())
}

/// A node's `logger` gets its request and answer as CloudEvents (binary mode), with the record's
/// request id; a record with Seldon-Skip-Logging gets none.
#[tokio::test(flavor = "multi_thread")]
async fn payload_logger_gets_cloudevents() -> Result<()> {
    let model = models::seldon_with_env("GraphNode", "MODEL", &[("NODE_ROLE", "a")])?;
    let dir = tempfile::tempdir()?;
    let events = dir.path().join("events.jsonl");
    let port = free_port();
    let _sink = Proc::spawn(
        "sink",
        std::process::Command::new(python())
            .arg(repo_root().join("tests/py/sink.py"))
            .arg(port.to_string())
            .arg(&events),
    )?;
    wait_port(port, Duration::from_secs(20))?;
    let graph = format!(
        "name: a\ntype: MODEL\nendpoint: {}\nlogger: {{url: \"http://127.0.0.1:{port}/\", mode: all}}",
        endpoint(&model)
    );
    let mut recs = records(6, &[0]);
    recs[5]
        .headers
        .push(("Seldon-Skip-Logging".into(), "true".into()));
    let answers = run("rest", &graph, &recs).await?;
    let lines = wait_for(Duration::from_secs(20), "10 logger events", || {
        let text = std::fs::read_to_string(&events).unwrap_or_default();
        let lines: Vec<Value> = text
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        (lines.len() >= 10).then_some(lines)
    })?;
    std::thread::sleep(Duration::from_millis(500));
    let text = std::fs::read_to_string(&events)?;
    assert_eq!(
        text.lines().count(),
        10,
        "two events per logged record: {text}"
    );
    for (i, (a, v)) in answers.iter().enumerate().take(5) {
        let id = &a.headers["Seldon-Puid"];
        let mine: Vec<&Value> = lines
            .iter()
            .filter(|e| e["headers"]["ce-requestid"] == json!(id))
            .collect();
        assert_eq!(mine.len(), 2, "record {i}: request and response: {lines:?}");
        for e in &mine {
            let h = &e["headers"];
            assert_eq!(h["ce-specversion"], "1.0");
            assert_eq!(h["ce-modelid"], "a");
            assert_eq!(h["content-type"], "application/json");
        }
        let resp = mine
            .iter()
            .find(|e| e["headers"]["ce-type"] == "io.seldon.serving.inference.response")
            .expect("a response event");
        let body: Value = serde_json::from_str(resp["body"].as_str().unwrap())?;
        assert_eq!(body["data"], v["data"], "the logged answer is the answer");
        let req = mine
            .iter()
            .find(|e| e["headers"]["ce-type"] == "io.seldon.serving.inference.request")
            .expect("a request event");
        let body: Value = serde_json::from_str(req["body"].as_str().unwrap())?;
        assert_eq!(body["data"]["ndarray"][0][0], json!(recs[i].x));
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn router_graph_over_rest() -> Result<()> {
    router_graph("rest").await
}

#[tokio::test(flavor = "multi_thread")]
async fn router_graph_over_grpc() -> Result<()> {
    router_graph("grpc").await
}

#[tokio::test(flavor = "multi_thread")]
async fn combiner_abtest_and_methods_over_rest() -> Result<()> {
    combiner_abtest_methods("rest").await
}

#[tokio::test(flavor = "multi_thread")]
async fn combiner_abtest_and_methods_over_grpc() -> Result<()> {
    combiner_abtest_methods("grpc").await
}
