//! kafka-infer end to end: a real broker, real model servers (MLServer, Seldon's Python wrapper,
//! our TF Serving stand-in), kafka-infer started from a SeldonDeployment YAML, records in and
//! answers out read back with librdkafka.

use std::collections::BTreeMap;

use anyhow::Result;
use bytes::Bytes;
use codec::Transcoder;
use kafka_infer_tests::{
    Answer, Broker,
    models::{self, KafkaInfer},
    py, read_topic, unhex, unique,
};
use kafka_infer_tests::{kafka_env, produce_all, seldon_deployment};
use kafka_io::OutRecord;
use serde_json::{Value, json};

/// A SeldonDeployment (serverType: kafka) with one MODEL node on 127.0.0.1:`port`.
fn deployment(
    protocol: &str,
    transport: &str,
    node: &str,
    port: u16,
    broker: &Broker,
    input: &str,
    output: &str,
) -> String {
    seldon_deployment(
        protocol,
        transport,
        &kafka_env(broker, input, output),
        &format!("{{name: {node}, type: MODEL, endpoint: {{service_port: {port}}}, children: []}}"),
    )
}

struct Req {
    key: String,
    proto_name: Option<&'static str>,
    value: Bytes,
}

async fn produce(broker: &Broker, topic: &str, reqs: &[Req]) -> Result<()> {
    let records = reqs
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let mut headers = vec![("trace".to_string(), Bytes::from(format!("t{i}")))];
            if let Some(n) = r.proto_name {
                headers.push(("proto-name".into(), Bytes::from_static(n.as_bytes())));
            }
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

/// Runs `reqs` through kafka-infer started from a deployment, returns answers by request index
/// (taken from the `trace` header), after checking keys, headers and per-partition order.
async fn through(
    extra_args: &[&str],
    server_port: u16,
    protocol: &str,
    transport: &str,
    node: &str,
    reqs: Vec<Req>,
) -> Result<Vec<(Answer, Value)>> {
    let broker = Broker::start()?;
    let (input, output) = (unique("in"), unique("out"));
    broker.create_topic(&input, 3)?;
    broker.create_topic(&output, 3)?;
    let dir = tempfile::tempdir()?;
    let yaml = dir.path().join("sdep.yaml");
    std::fs::write(
        &yaml,
        deployment(
            protocol,
            transport,
            node,
            server_port,
            &broker,
            &input,
            &output,
        ),
    )?;
    let mut args = vec!["-f", yaml.to_str().unwrap(), "--session-timeout", "4s"];
    args.extend_from_slice(extra_args);
    let ki = KafkaInfer::start(&args, &[])?;
    produce(&broker, &input, &reqs).await?;
    let answers = read_topic(&broker.bootstrap(), &output, reqs.len(), 60)?;
    assert_eq!(answers.len(), reqs.len(), "every request answered once");
    // Keys kept, headers copied, one answer per request.
    let mut by_index: Vec<Option<(Answer, Value)>> = (0..reqs.len()).map(|_| None).collect();
    for a in answers {
        let i: usize = a.headers["trace"].trim_start_matches('t').parse()?;
        assert_eq!(a.key, reqs[i].key, "key kept");
        assert!(by_index[i].is_none(), "request {i} answered twice");
        let v = answer_json(&a);
        by_index[i] = Some((a, v));
    }
    let answered: Vec<(Answer, Value)> = by_index.into_iter().map(Option::unwrap).collect();
    // Order: within an output partition, answers to one key come in request order.
    let mut last: BTreeMap<(i64, String), (i64, usize)> = BTreeMap::new();
    for (i, (a, _)) in answered.iter().enumerate() {
        if let Some((off, j)) = last.get(&(a.partition, a.key.clone())) {
            assert!(*off < a.offset && *j < i, "order broken for key {}", a.key);
        }
        last.insert((a.partition, a.key.clone()), (a.offset, i));
    }
    let errors = ki
        .metric("kafka_infer_records_total{result=\"error\"}")
        .unwrap_or(0.0);
    assert_eq!(errors, 0.0, "no error records");
    drop(ki);
    Ok(answered)
}

fn keys(i: usize) -> String {
    format!("key-{}", i % 5)
}

fn v2_json(i: usize) -> Bytes {
    Bytes::from(json!({"id": format!("r{i}"), "inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "data": [i as f64, 0.5]}]}).to_string())
}

fn v2_requests(n: usize) -> Result<Vec<Req>> {
    // Half JSON, half protobuf made by MLServer's own classes (a quarter with raw contents).
    let pb: Vec<String> = serde_json::from_str(&py("make_proto.py", &["v2", &n.to_string()])?)?;
    let raw: Vec<String> = serde_json::from_str(&py("make_proto.py", &["v2raw", &n.to_string()])?)?;
    Ok((0..n)
        .map(|i| match i % 4 {
            0 | 1 => Req {
                key: keys(i),
                proto_name: None,
                value: v2_json(i),
            },
            2 => Req {
                key: keys(i),
                proto_name: Some("inference.ModelInferRequest"),
                value: Bytes::from(unhex(&pb[i])),
            },
            _ => Req {
                key: keys(i),
                proto_name: Some("inference.ModelInferRequest"),
                value: Bytes::from(unhex(&raw[i])),
            },
        })
        .collect())
}

fn check_v2(answers: &[(Answer, Value)]) {
    for (i, (a, v)) in answers.iter().enumerate() {
        let proto = i % 4 >= 2;
        assert_eq!(
            a.headers.get("proto-name").map(String::as_str),
            proto.then_some("inference.ModelInferResponse"),
            "answer {i} in the request's form"
        );
        let out = &v["outputs"][0];
        let data: Vec<f64> =
            if let Some(raw) = v.pointer("/raw_output_contents/0").and_then(Value::as_str) {
                use base64::Engine;
                let b = base64::engine::general_purpose::STANDARD
                    .decode(raw)
                    .unwrap();
                b.chunks(4)
                    .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
                    .collect()
            } else {
                let d = out
                    .get("data")
                    .or_else(|| out.pointer("/contents/fp32_contents"));
                d.and_then(Value::as_array)
                    .unwrap_or_else(|| panic!("answer {i}: {v}"))
                    .iter()
                    .map(|x| x.as_f64().unwrap())
                    .collect()
            };
        assert_eq!(data, vec![2.0 * i as f64, 1.0], "answer {i}: {v}");
        assert_eq!(v["id"], json!(format!("r{i}")));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v2_over_rest_with_mlserver() -> Result<()> {
    let m = models::mlserver()?;
    let answers = through(
        &[],
        m.http_port,
        "kfserving",
        "rest",
        "doubler",
        v2_requests(40)?,
    )
    .await?;
    check_v2(&answers);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v2_over_grpc_with_mlserver() -> Result<()> {
    let m = models::mlserver()?;
    let answers = through(
        &[],
        m.grpc_port,
        "kfserving",
        "grpc",
        "doubler",
        v2_requests(40)?,
    )
    .await?;
    check_v2(&answers);
    Ok(())
}

fn seldon_requests(n: usize) -> Result<Vec<Req>> {
    let pb: Vec<String> =
        serde_json::from_str(&py_seldon("make_proto.py", &["seldon", &n.to_string()])?)?;
    Ok((0..n)
        .map(|i| {
            let json = match i % 5 {
                0 => json!({"data": {"ndarray": [[i, 1]]}}),
                1 => json!({"data": {"names": ["a", "b"], "tensor": {"shape": [1, 2], "values": [i, 1]}}}),
                2 => json!({"strData": format!("s{i}")}),
                3 => json!({"jsonData": {"i": i}}),
                _ => return Req { key: keys(i), proto_name: Some("seldon.protos.SeldonMessage"), value: Bytes::from(unhex(&pb[i])) },
            };
            Req { key: keys(i), proto_name: None, value: Bytes::from(json.to_string()) }
        })
        .collect())
}

fn py_seldon(script: &str, args: &[&str]) -> Result<String> {
    let out = std::process::Command::new(kafka_infer_tests::venv_seldon().join("bin/python"))
        .arg(kafka_infer_tests::repo_root().join("tests/py").join(script))
        .args(args)
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?)
}

fn check_seldon(answers: &[(Answer, Value)]) {
    for (i, (a, v)) in answers.iter().enumerate() {
        let num = |x: &Value| x.as_f64().unwrap();
        match i % 5 {
            0 | 4 => {
                let row = v
                    .pointer("/data/ndarray/0")
                    .unwrap_or_else(|| panic!("answer {i}: {v}"));
                assert_eq!(
                    row.as_array().unwrap().iter().map(num).collect::<Vec<_>>(),
                    [10.0 * i as f64, 10.0],
                    "{v}"
                );
            }
            1 => {
                let vals = v
                    .pointer("/data/tensor/values")
                    .unwrap_or_else(|| panic!("answer {i}: {v}"));
                assert_eq!(
                    vals.as_array().unwrap().iter().map(num).collect::<Vec<_>>(),
                    [10.0 * i as f64, 10.0]
                );
            }
            2 => assert_eq!(v["strData"], json!(format!("seen:s{i}")), "{v}"),
            _ => assert_eq!(v["jsonData"]["seen"]["i"].as_f64(), Some(i as f64), "{v}"),
        }
        assert_eq!(
            a.headers.contains_key("proto-name"),
            i % 5 == 4,
            "answer {i} in the request's form"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seldon_over_rest_with_the_python_wrapper() -> Result<()> {
    let s = models::seldon("Scaler", "MODEL")?;
    let answers = through(
        &[],
        s.http_port,
        "seldon",
        "rest",
        "scaler",
        seldon_requests(25)?,
    )
    .await?;
    check_seldon(&answers);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seldon_over_grpc_with_the_python_wrapper() -> Result<()> {
    let s = models::seldon("Scaler", "MODEL")?;
    let answers = through(
        &[],
        s.grpc_port,
        "seldon",
        "grpc",
        "scaler",
        seldon_requests(25)?,
    )
    .await?;
    check_seldon(&answers);
    Ok(())
}

/// A cifar10 image (1x32x32x3 floats in [0, 1]) derived from `i`, and its mean.
fn cifar_image(i: usize) -> (Vec<Vec<Vec<f32>>>, f64) {
    let img: Vec<Vec<Vec<f32>>> = (0..32)
        .map(|r| {
            (0..32)
                .map(|c| {
                    (0..3)
                        .map(|k| ((r * 96 + c * 3 + k + i * 7) % 256) as f32 / 256.0)
                        .collect()
                })
                .collect()
        })
        .collect();
    let sum: f64 = img.iter().flatten().flatten().map(|x| *x as f64).sum();
    (img, sum / 3072.0)
}

fn tf_requests(n: usize) -> Vec<Req> {
    use base64::Engine;
    let t = Transcoder::default();
    (0..n)
        .map(|i| {
            let (img, _) = cifar_image(i);
            if i % 2 == 0 {
                // REST form, as the Seldon cifar10 example sends it.
                Req { key: keys(i), proto_name: None, value: Bytes::from(json!({"instances": [img]}).to_string()) }
            } else {
                // gRPC form: PredictRequest with a tensor_content tensor, as tf.make_tensor_proto writes it.
                let raw: Vec<u8> = img.iter().flatten().flatten().flat_map(|f| f.to_le_bytes()).collect();
                let req = json!({
                    "model_spec": {"name": "resnet32", "signature_name": "serving_default"},
                    "inputs": {"input_1": {"dtype": "DT_FLOAT",
                        "tensor_shape": {"dim": [{"size": 1}, {"size": 32}, {"size": 32}, {"size": 3}]},
                        "tensor_content": base64::engine::general_purpose::STANDARD.encode(raw)}}});
                let value = t.from_proto_json("tensorflow.serving.PredictRequest", req).unwrap();
                Req { key: keys(i), proto_name: Some("tensorflow.serving.PredictRequest"), value }
            }
        })
        .collect()
}

fn check_tf(answers: &[(Answer, Value)]) {
    for (i, (a, v)) in answers.iter().enumerate() {
        let (_, mean) = cifar_image(i);
        let scores: Vec<f64> = if i % 2 == 0 {
            assert!(!a.headers.contains_key("proto-name"));
            v.pointer("/predictions/0")
                .and_then(Value::as_array)
                .unwrap_or_else(|| panic!("answer {i}: {v}"))
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect()
        } else {
            assert_eq!(
                a.headers.get("proto-name").map(String::as_str),
                Some("tensorflow.serving.PredictResponse")
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
        let want = (mean * 1e4).round() / 1e4;
        for (k, s) in scores.iter().enumerate() {
            assert!(
                (s - (want + k as f64)).abs() < 1e-3,
                "answer {i} score {k}: {s} vs {}",
                want + k as f64
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tensorflow_over_rest_with_the_tf_stand_in() -> Result<()> {
    let m = models::test_model("tensorflow", "resnet32", "resnet")?;
    let answers = through(
        &[],
        m.http_port,
        "tensorflow",
        "rest",
        "resnet32",
        tf_requests(10),
    )
    .await?;
    check_tf(&answers);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tensorflow_over_grpc_with_the_tf_stand_in() -> Result<()> {
    let m = models::test_model("tensorflow", "resnet32", "resnet")?;
    let answers = through(
        &["--tf-input-name", "input_1"],
        m.grpc_port,
        "tensorflow",
        "grpc",
        "resnet32",
        tf_requests(10),
    )
    .await?;
    check_tf(&answers);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_path_override_reaches_a_seldon_external_api() -> Result<()> {
    let m = models::test_model("seldon", "graph", "echo")?;
    let reqs: Vec<Req> = (0..5)
        .map(|i| Req {
            key: keys(i),
            proto_name: None,
            value: Bytes::from(json!({"data": {"ndarray": [[i]]}}).to_string()),
        })
        .collect();
    let answers = through(
        &["--model-path", "/api/v1.0/predictions"],
        m.http_port,
        "seldon",
        "rest",
        "graph",
        reqs,
    )
    .await?;
    for (i, (_, v)) in answers.iter().enumerate() {
        assert_eq!(
            v.pointer("/meta/tags/path"),
            Some(&json!("/api/v1.0/predictions")),
            "{v}"
        );
        assert_eq!(
            v.pointer("/data/ndarray/0/0").and_then(Value::as_f64),
            Some(i as f64)
        );
    }
    Ok(())
}
