//! Seldon-executor graphs for the v2 and tensorflow protocols, end to end: a real broker, real
//! model servers (MLServer serving tests/models/mlserver; our TF Serving stand-in), kafka-infer
//! started from a SeldonDeployment whose graph has several nodes, answers read back with
//! librdkafka. And the record's headers, request id and trace context through MLServer (REST
//! headers, gRPC metadata) and the models' `x-*` answers back onto the output record.
//!
//! Every node is called under its own name (`/v2/models/<node>/infer`, gRPC `model_name`, TF
//! `/v1/models/<node>:predict`, `model_spec.name`), so each model here serves under its node's
//! name and refuses any other. (Over gRPC a record that names a model, or none, still takes
//! that name to the graph's first call: the two ignored tests, `..._whatever_the_record_names`,
//! pass once it does not.) The number of model calls kafka-infer made is read from its
//! metrics: a node skipped (or called twice) fails the test even where the answer would not
//! show it.

use std::{collections::BTreeSet, time::Duration};

use anyhow::{Context, Result, ensure};
use base64::Engine;
use bytes::Bytes;
use codec::Transcoder;
use kafka_infer_tests::{
    Answer, Broker,
    models::{self, KafkaInfer, Server},
    py, read_topic, unhex, unique, wait_for,
};
use kafka_infer_tests::{kafka_env, produce_all, seldon_deployment};
use kafka_io::OutRecord;
use serde_json::{Value, json};

const V2_REQUEST: &str = "inference.ModelInferRequest";
const V2_RESPONSE: &str = "inference.ModelInferResponse";
const TF_REQUEST: &str = "tensorflow.serving.PredictRequest";
const TF_RESPONSE: &str = "tensorflow.serving.PredictResponse";

/// One input record: key, headers (an `idx` header is added), value.
struct Rec {
    key: String,
    headers: Vec<(String, Bytes)>,
    value: Bytes,
}

impl Rec {
    fn json(i: usize, v: Value) -> Self {
        Self {
            key: format!("key-{}", i % 3),
            headers: Vec::new(),
            value: Bytes::from(v.to_string()),
        }
    }

    fn proto(i: usize, name: &'static str, value: Bytes) -> Self {
        Self {
            key: format!("key-{}", i % 3),
            headers: vec![("proto-name".into(), Bytes::from_static(name.as_bytes()))],
            value,
        }
    }

    fn header(mut self, k: &str, v: impl Into<String>) -> Self {
        self.headers.push((k.to_owned(), Bytes::from(v.into())));
        self
    }
}

/// A graph node in YAML flow style, its endpoint on 127.0.0.1 with both ports (kafka-infer
/// picks httpPort over REST and grpcPort over gRPC, as Seldon's executor does).
fn node(name: &str, kind: &str, server: &Server, children: &[String]) -> String {
    format!(
        "{{name: {name}, type: {kind}, endpoint: {{service_host: 127.0.0.1, httpPort: {}, \
         grpcPort: {}}}, children: [{}]}}",
        server.http_port,
        server.grpc_port,
        children.join(", ")
    )
}

fn deployment(
    protocol: &str,
    transport: &str,
    graph: &str,
    broker: &Broker,
    input: &str,
    output: &str,
) -> String {
    seldon_deployment(
        protocol,
        transport,
        &kafka_env(broker, input, output),
        graph,
    )
}

async fn produce(broker: &Broker, topic: &str, recs: &[Rec]) -> Result<()> {
    let records = recs
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let mut headers = vec![("idx".to_string(), Bytes::from(i.to_string()))];
            headers.extend(r.headers.iter().cloned());
            OutRecord {
                key: Some(Bytes::from(r.key.clone())),
                value: Some(r.value.clone()),
                headers,
            }
        })
        .collect();
    produce_all(broker.settings(), topic, records).await
}

/// The answer as JSON: JSON as is, protobuf through the pool (named by its proto-name header).
fn answer_json(a: &Answer) -> Value {
    match a.headers.get("proto-name") {
        Some(name) => Transcoder::default()
            .to_proto_json(name, &a.value, false)
            .unwrap_or_else(|e| panic!("{name}: {e}")),
        None => serde_json::from_slice(&a.value)
            .unwrap_or_else(|e| panic!("not JSON: {e}: {}", String::from_utf8_lossy(&a.value))),
    }
}

/// Runs `recs` through kafka-infer started from a deployment with `graph`; returns the answers
/// by record index (the `idx` header), after checking that each record got exactly one answer,
/// none an error record, with its key, and that the model was called `calls_per_record` times
/// per record.
async fn through(
    extra_args: &[&str],
    protocol: &str,
    transport: &str,
    graph: &str,
    calls_per_record: usize,
    recs: Vec<Rec>,
) -> Result<Vec<(Answer, Value)>> {
    let broker = Broker::start()?;
    let (input, output) = (unique("in"), unique("out"));
    broker.create_topic(&input, 3)?;
    broker.create_topic(&output, 3)?;
    let dir = tempfile::tempdir()?;
    let yaml = dir.path().join("sdep.yaml");
    std::fs::write(
        &yaml,
        deployment(protocol, transport, graph, &broker, &input, &output),
    )?;
    let mut args = vec!["-f", yaml.to_str().unwrap(), "--session-timeout", "4s"];
    args.extend_from_slice(extra_args);
    let ki = KafkaInfer::start(&args, &[])?;
    produce(&broker, &input, &recs).await?;
    let answers = read_topic(&broker.bootstrap(), &output, recs.len(), 60)?;
    let mut by_index: Vec<Option<(Answer, Value)>> = (0..recs.len()).map(|_| None).collect();
    let mut errors = Vec::new();
    for a in answers {
        let i: usize = a.headers.get("idx").context("idx header copied")?.parse()?;
        if let Some(e) = a.headers.get("kafka-infer-error") {
            errors.push(format!("record {i}: {e}"));
        }
        ensure!(a.key == recs[i].key, "record {i}: key kept");
        ensure!(by_index[i].is_none(), "record {i} answered twice");
        let v = answer_json(&a);
        by_index[i] = Some((a, v));
    }
    ensure!(errors.is_empty(), "error records:\n{}", errors.join("\n"));
    let missing: Vec<usize> = (0..recs.len()).filter(|i| by_index[*i].is_none()).collect();
    ensure!(missing.is_empty(), "no answer for records {missing:?}");
    // Every call is one sample of the model-call histogram (a retry would be another).
    let calls = wait_for(Duration::from_secs(5), "the model calls counted", || {
        ki.metric("kafka_infer_model_request_duration_seconds_count")
    })?;
    ensure!(
        calls == (calls_per_record * recs.len()) as f64,
        "{calls} model calls for {} records through a graph of {calls_per_record} calls each",
        recs.len()
    );
    drop(ki);
    Ok(by_index.into_iter().map(Option::unwrap).collect())
}

/// MLServer with every model of tests/models/mlserver ready.
fn mlserver() -> Result<Server> {
    let m = models::mlserver()?;
    for model in ["plusone", "headers"] {
        wait_for(Duration::from_secs(60), "MLServer model ready", || {
            matches!(
                kafka_infer_tests::http_get(m.http_port, &format!("/v2/models/{model}/ready")),
                Ok((200, _))
            )
            .then_some(())
        })?;
    }
    Ok(m)
}

// ---------------------------------------------------------------------------------------------
// v2: TRANSFORMER plusone -> MODEL doubler, both in MLServer.

fn v2_graph(m: &Server) -> String {
    node(
        "plusone",
        "TRANSFORMER",
        m,
        &[node("doubler", "MODEL", m, &[])],
    )
}

/// A v2 ModelInferRequest (protobuf) for `model` with x = [i, 0.5], as contents or raw contents.
fn v2_proto(i: usize, model: &str, raw: bool) -> Bytes {
    let x = [i as f32, 0.5];
    let mut req = json!({"model_name": model, "id": format!("r{i}"),
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [2]}]});
    if raw {
        let b: Vec<u8> = x.iter().flat_map(|f| f.to_le_bytes()).collect();
        req["raw_input_contents"] = json!([base64::engine::general_purpose::STANDARD.encode(b)]);
    } else {
        req["inputs"][0]["contents"] = json!({"fp32_contents": x});
    }
    Transcoder::default()
        .from_proto_json(V2_REQUEST, req)
        .expect("a ModelInferRequest")
}

/// Half JSON, a quarter protobuf with contents, a quarter protobuf with raw contents; the
/// protobuf ones name `model`.
fn v2_records(n: usize, model: &str) -> Vec<Rec> {
    (0..n)
        .map(|i| match i % 4 {
            0 | 1 => Rec::json(
                i,
                json!({"id": format!("r{i}"), "inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "data": [i as f64, 0.5]}]}),
            ),
            k => Rec::proto(i, V2_REQUEST, v2_proto(i, model, k == 3)),
        })
        .collect()
}

/// The values of output `name` of a v2 answer (JSON `data`, protobuf contents or raw contents).
fn v2_output(v: &Value, name: &str) -> Vec<f64> {
    let outs = v["outputs"]
        .as_array()
        .unwrap_or_else(|| panic!("no outputs: {v}"));
    let k = outs
        .iter()
        .position(|o| o["name"] == name)
        .unwrap_or_else(|| panic!("no output {name}: {v}"));
    if let Some(raw) = v
        .pointer(&format!("/raw_output_contents/{k}"))
        .and_then(Value::as_str)
    {
        let b = base64::engine::general_purpose::STANDARD
            .decode(raw)
            .unwrap();
        return b
            .chunks(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
            .collect();
    }
    let o = &outs[k];
    o.get("data")
        .or_else(|| o.pointer("/contents/fp32_contents"))
        .and_then(Value::as_array)
        .unwrap_or_else(|| panic!("output {name} has no values: {v}"))
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

fn check_v2_graph(answers: &[(Answer, Value)]) {
    for (i, (a, v)) in answers.iter().enumerate() {
        let proto = i % 4 >= 2;
        assert_eq!(
            a.headers.get("proto-name").map(String::as_str),
            proto.then_some(V2_RESPONSE),
            "answer {i} in the record's form"
        );
        // plusone names its output x_plus1, doubler that one's x_plus1_x2: 2 * (x + 1).
        let x = [i as f64, 0.5];
        let want: Vec<f64> = x.iter().map(|x| 2.0 * (x + 1.0)).collect();
        assert_eq!(v2_output(v, "x_plus1_x2"), want, "answer {i}: {v}");
        assert_eq!(v["model_name"], "doubler", "answer {i}: the last node's");
        assert_eq!(v["id"], json!(format!("r{i}")), "answer {i}: id kept");
    }
}

/// The protobuf records name `doubler` (as if written for a single-model deployment): over
/// REST the path names each node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v2_graph_over_rest_with_mlserver() -> Result<()> {
    let m = mlserver()?;
    let recs = v2_records(16, "doubler");
    let answers = through(&[], "kfserving", "rest", &v2_graph(&m), 2, recs).await?;
    check_v2_graph(&answers);
    Ok(())
}

/// The protobuf records name `plusone`, the first node called (see the ignored test below for
/// records naming another model).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v2_graph_over_grpc_with_mlserver() -> Result<()> {
    let m = mlserver()?;
    let recs = v2_records(16, "plusone");
    let answers = through(&[], "kfserving", "grpc", &v2_graph(&m), 2, recs).await?;
    check_v2_graph(&answers);
    Ok(())
}

/// Records written for a single-model deployment name that model: make_proto.py's
/// ModelInferRequests (made with MLServer's own classes) say `doubler`, a JSON body may carry
/// `model_name` too, and some records name no model at all. In the graph each node is still
/// called under its own name, as over REST (where the path names the node).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v2_graph_over_grpc_calls_each_node_by_its_name_whatever_the_record_names() -> Result<()> {
    let m = mlserver()?;
    let n = 9;
    let pb: Vec<String> = serde_json::from_str(&py("make_proto.py", &["v2", &n.to_string()])?)?;
    let recs = (0..n)
        .map(|i| match i % 3 {
            0 => Rec::json(
                i,
                json!({"model_name": "doubler", "id": format!("r{i}"), "inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "data": [i as f64, 0.5]}]}),
            ),
            1 => Rec::proto(i, V2_REQUEST, Bytes::from(unhex(&pb[i]))),
            _ => Rec::proto(i, V2_REQUEST, v2_proto(i, "", false)),
        })
        .collect();
    let answers = through(&[], "kfserving", "grpc", &v2_graph(&m), 2, recs).await?;
    for (i, (_, v)) in answers.iter().enumerate() {
        let want: Vec<f64> = [i as f64, 0.5].iter().map(|x| 2.0 * (x + 1.0)).collect();
        assert_eq!(v2_output(v, "x_plus1_x2"), want, "answer {i}: {v}");
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// tensorflow: OUTPUT_TRANSFORMER post (resnet) -> TRANSFORMER prep (echo) -> MODEL resnet32
// (resnet), each its own TF Serving stand-in serving under its node's name.

struct TfGraph {
    _servers: [Server; 3],
    yaml: String,
}

fn tf_graph() -> Result<TfGraph> {
    let post = models::test_model("tensorflow", "post", "resnet")?;
    let prep = models::test_model("tensorflow", "prep", "echo")?;
    let model = models::test_model("tensorflow", "resnet32", "resnet")?;
    let yaml = node(
        "post",
        "OUTPUT_TRANSFORMER",
        &post,
        &[node(
            "prep",
            "TRANSFORMER",
            &prep,
            &[node("resnet32", "MODEL", &model, &[])],
        )],
    );
    Ok(TfGraph {
        _servers: [post, prep, model],
        yaml,
    })
}

/// A cifar10 image (1x32x32x3 floats in [0, 1]) derived from `i`, and its mean.
fn cifar_image(i: usize) -> (Vec<Vec<Vec<f32>>>, f64) {
    let img: Vec<Vec<Vec<f32>>> = (0..32)
        .map(|r| {
            (0..32)
                .map(|c| {
                    (0..3)
                        .map(|k| ((r * 96 + c * 3 + k + i * 5) % 256) as f32 / 256.0)
                        .collect()
                })
                .collect()
        })
        .collect();
    let sum: f64 = img.iter().flatten().flatten().map(|x| *x as f64).sum();
    (img, sum / 3072.0)
}

/// Even: REST row form (`instances`); odd: a PredictRequest with a tensor_content tensor whose
/// model_spec.name is `model(i)`.
fn tf_records(n: usize, model: impl Fn(usize) -> &'static str) -> Vec<Rec> {
    let t = Transcoder::default();
    (0..n)
        .map(|i| {
            let (img, _) = cifar_image(i);
            if i % 2 == 0 {
                Rec::json(i, json!({"instances": [img]}))
            } else {
                let raw: Vec<u8> = img
                    .iter()
                    .flatten()
                    .flatten()
                    .flat_map(|f| f.to_le_bytes())
                    .collect();
                let req = json!({
                    "model_spec": {"name": model(i), "signature_name": "serving_default"},
                    "inputs": {"input_1": {"dtype": "DT_FLOAT",
                        "tensor_shape": {"dim": [{"size": 1}, {"size": 32}, {"size": 32}, {"size": 3}]},
                        "tensor_content": base64::engine::general_purpose::STANDARD.encode(raw)}}});
                Rec::proto(i, TF_REQUEST, t.from_proto_json(TF_REQUEST, req).unwrap())
            }
        })
        .collect()
}

/// The stand-in's resnet answers scores[k] = round(mean, 4) + k; resnet32 then post (another
/// resnet, over those ten scores) make round(mean, 4) + 4.5 + k. The echo keeps it as it is.
fn check_tf_graph(answers: &[(Answer, Value)]) {
    for (i, (a, v)) in answers.iter().enumerate() {
        let (_, mean) = cifar_image(i);
        let scores: Vec<f64> = if i % 2 == 0 {
            assert!(!a.headers.contains_key("proto-name"), "answer {i}: JSON");
            v.pointer("/predictions/0")
                .and_then(Value::as_array)
                .unwrap_or_else(|| panic!("answer {i}: {v}"))
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect()
        } else {
            assert_eq!(
                a.headers.get("proto-name").map(String::as_str),
                Some(TF_RESPONSE),
                "answer {i}: protobuf"
            );
            let t = v["outputs"]
                .as_object()
                .and_then(|o| o.values().next())
                .unwrap_or_else(|| panic!("answer {i}: {v}"));
            t["float_val"]
                .as_array()
                .unwrap_or_else(|| panic!("answer {i}: {v}"))
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect()
        };
        assert_eq!(scores.len(), 10, "answer {i}: {v}");
        let base = (mean * 1e4).round() / 1e4 + 4.5;
        for (k, s) in scores.iter().enumerate() {
            assert!(
                (s - (base + k as f64)).abs() < 1e-3,
                "answer {i} score {k}: {s}, want {} (one resnet call would give {})",
                base + k as f64,
                base - 4.5 + k as f64
            );
        }
    }
}

/// The PredictRequest records name `resnet32` (as if written for a single-model deployment):
/// over REST the path names each node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tensorflow_graph_over_rest_with_the_tf_stand_in() -> Result<()> {
    let g = tf_graph()?;
    let recs = tf_records(10, |_| "resnet32");
    let answers = through(&[], "tensorflow", "rest", &g.yaml, 3, recs).await?;
    check_tf_graph(&answers);
    Ok(())
}

/// The PredictRequest records name `prep`, the first node called (see the ignored test below
/// for records naming another model).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tensorflow_graph_over_grpc_with_the_tf_stand_in() -> Result<()> {
    let g = tf_graph()?;
    let answers = through(
        &["--tf-input-name", "input_1"],
        "tensorflow",
        "grpc",
        &g.yaml,
        3,
        tf_records(10, |_| "prep"),
    )
    .await?;
    check_tf_graph(&answers);
    Ok(())
}

/// PredictRequest records naming the model of a single-node deployment (`resnet32`, as e2e.rs
/// sends them), the graph's root (`post`, which makes no input call), or nothing: each node is
/// still called under its own name, as over REST.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tensorflow_graph_over_grpc_calls_each_node_by_its_name_whatever_the_record_names()
-> Result<()> {
    let g = tf_graph()?;
    let answers = through(
        &["--tf-input-name", "input_1"],
        "tensorflow",
        "grpc",
        &g.yaml,
        3,
        tf_records(12, |i| ["resnet32", "post", ""][i / 2 % 3]),
    )
    .await?;
    check_tf_graph(&answers);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Headers: TRANSFORMER plusone -> MODEL headers, in MLServer. plusone answers the `tenant` it
// saw as `x-plusone-tenant`; headers returns its inputs, what it saw as output `saw`, and
// `x-model-saw` (the request id it saw) plus `model-private` as response headers (gRPC:
// trailing metadata).

const TRACE_IN: u128 = 0x4bf9_2f35_77b3_4da6_a3ce_929d_0e0e_4700;
const SPAN_IN: u64 = 0x00f0_67aa_0ba9_0200;

fn traceparent_in(i: usize) -> String {
    format!(
        "00-{:032x}-{:016x}-01",
        TRACE_IN + i as u128,
        SPAN_IN + i as u64
    )
}

/// Record `i`: every one has `tenant` and `other`; then by i % 4:
/// 0: x-request-id, traceparent, tracestate; 1: nothing more (a generated id, no trace);
/// 2: `X-Request-Id` (any case), traceparent; 3: protobuf, x-request-id, traceparent,
/// tracestate.
fn header_records(n: usize) -> Vec<Rec> {
    (0..n)
        .map(|i| {
            let r = if i % 4 == 3 {
                Rec::proto(i, V2_REQUEST, v2_proto(i, "plusone", false))
            } else {
                Rec::json(
                    i,
                    json!({"id": format!("r{i}"), "inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "data": [i as f64, 0.5]}]}),
                )
            };
            let r = r
                .header("tenant", format!("tenant-{i}"))
                .header("other", format!("o{i}"));
            match i % 4 {
                0 | 3 => r
                    .header("x-request-id", format!("rid-{i}"))
                    .header("traceparent", traceparent_in(i))
                    .header("tracestate", format!("vendor=v{i}")),
                1 => r,
                _ => r
                    .header("X-Request-Id", format!("RID-{i}"))
                    .header("traceparent", traceparent_in(i)),
            }
        })
        .collect()
}

/// The `saw` output of the headers model: the headers it was called with.
fn saw(v: &Value) -> serde_json::Map<String, Value> {
    let outs = v["outputs"]
        .as_array()
        .unwrap_or_else(|| panic!("no outputs: {v}"));
    let k = outs
        .iter()
        .position(|o| o["name"] == "saw")
        .unwrap_or_else(|| panic!("no output saw: {v}"));
    let text = if let Some(raw) = v
        .pointer(&format!("/raw_output_contents/{k}"))
        .and_then(Value::as_str)
    {
        // Raw BYTES: a 4-byte little-endian length, then the bytes.
        let b = base64::engine::general_purpose::STANDARD
            .decode(raw)
            .unwrap();
        String::from_utf8(b[4..].to_vec()).unwrap()
    } else if let Some(b) = outs[k]
        .pointer("/contents/bytes_contents/0")
        .and_then(Value::as_str)
    {
        String::from_utf8(base64::engine::general_purpose::STANDARD.decode(b).unwrap()).unwrap()
    } else {
        outs[k]
            .pointer("/data/0")
            .and_then(Value::as_str)
            .unwrap_or_else(|| panic!("saw has no string: {v}"))
            .to_owned()
    };
    serde_json::from_str::<Value>(&text)
        .unwrap_or_else(|e| panic!("saw is not JSON ({e}): {text}"))
        .as_object()
        .cloned()
        .unwrap()
}

/// `all_forwarded`: the record's `other` header reached the models (--forward-headers `*`),
/// else it must not have (a list without it).
fn check_headers(answers: &[(Answer, Value)], all_forwarded: bool) {
    let mut generated = BTreeSet::new();
    for (i, (a, v)) in answers.iter().enumerate() {
        let seen = saw(v);
        let got = |k: &str| seen.get(k).and_then(Value::as_str);
        let on_record = |k: &str| a.headers.get(k).map(String::as_str);
        // The headers of this record reached this call (chained after plusone: x + 1).
        assert_eq!(
            v2_output(v, "x_plus1"),
            [i as f64 + 1.0, 1.5],
            "answer {i}: {v}"
        );
        assert_eq!(
            got("idx"),
            Some(i.to_string().as_str()),
            "answer {i}: {seen:?}"
        );
        assert_eq!(
            got("tenant"),
            Some(format!("tenant-{i}").as_str()),
            "answer {i}: {seen:?}"
        );
        assert_eq!(
            got("other"),
            all_forwarded.then(|| format!("o{i}")).as_deref(),
            "answer {i}: `other` forwarded only under `*`: {seen:?}"
        );
        assert!(!seen.contains_key("proto-name"), "answer {i}: {seen:?}");
        // The request id: the record's (any case), else a new one; the model saw the one the
        // output record carries.
        let rid = on_record("x-request-id")
            .unwrap_or_else(|| panic!("answer {i}: no x-request-id: {:?}", a.headers));
        match i % 4 {
            0 | 3 => assert_eq!(rid, format!("rid-{i}")),
            2 => assert_eq!(rid, format!("RID-{i}")),
            _ => {
                assert!(
                    rid.len() == 36 && rid.bytes().filter(|b| *b == b'-').count() == 4,
                    "answer {i}: a generated id is a UUID: {rid}"
                );
                assert!(
                    generated.insert(rid.to_owned()),
                    "answer {i}: id {rid} reused"
                );
            }
        }
        assert_eq!(got("x-request-id"), Some(rid), "answer {i}: {seen:?}");
        // The models' x-* answers, from the first node and from the last; not the others.
        assert_eq!(
            on_record("x-model-saw"),
            Some(rid),
            "answer {i}: {:?}",
            a.headers
        );
        assert_eq!(
            on_record("x-plusone-tenant"),
            Some(format!("tenant-{i}").as_str()),
            "answer {i}: {:?}",
            a.headers
        );
        assert!(
            !a.headers.contains_key("model-private"),
            "answer {i}: {:?}",
            a.headers
        );
        // Trace context: continued (same trace, our span as the new parent), the same to the
        // model and on the record; tracestate passed on; none made up.
        if i % 4 == 1 {
            assert_eq!(on_record("traceparent"), None, "answer {i}");
            assert_eq!(got("traceparent"), None, "answer {i}: {seen:?}");
            continue;
        }
        let tp = on_record("traceparent").unwrap_or_else(|| panic!("answer {i}: no traceparent"));
        let parts: Vec<&str> = tp.split('-').collect();
        assert_eq!(parts.len(), 4, "answer {i}: {tp}");
        assert_eq!(parts[0], "00");
        assert_eq!(
            parts[1],
            format!("{:032x}", TRACE_IN + i as u128),
            "answer {i}: trace kept"
        );
        assert_eq!(parts[2].len(), 16);
        assert_ne!(
            parts[2],
            format!("{:016x}", SPAN_IN + i as u64),
            "answer {i}: a new span"
        );
        assert_ne!(parts[2], "0000000000000000");
        assert_eq!(parts[3], "01", "answer {i}: sampled flag kept");
        assert_eq!(got("traceparent"), Some(tp), "answer {i}: {seen:?}");
        let state = (i % 4 != 2).then(|| format!("vendor=v{i}"));
        assert_eq!(got("tracestate"), state.as_deref(), "answer {i}: {seen:?}");
        assert_eq!(on_record("tracestate"), state.as_deref(), "answer {i}");
    }
}

fn headers_graph(m: &Server) -> String {
    node(
        "plusone",
        "TRANSFORMER",
        m,
        &[node("headers", "MODEL", m, &[])],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_reach_mlserver_and_come_back_over_rest() -> Result<()> {
    let m = mlserver()?;
    let answers = through(
        &[],
        "kfserving",
        "rest",
        &headers_graph(&m),
        2,
        header_records(12),
    )
    .await?;
    check_headers(&answers, true);
    Ok(())
}

/// Over gRPC MLServer reads metadata and answers its headers as trailing metadata.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_reach_mlserver_and_come_back_over_grpc() -> Result<()> {
    let m = mlserver()?;
    let answers = through(
        &["--forward-headers", "tenant,idx"],
        "kfserving",
        "grpc",
        &headers_graph(&m),
        2,
        header_records(12),
    )
    .await?;
    check_headers(&answers, false);
    Ok(())
}
