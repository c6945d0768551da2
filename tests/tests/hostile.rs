//! Hostile protobuf records end to end: tensors whose shapes claim far more than they carry
//! (one value for 2^40 elements), shapes their values do not fill, negative dimensions, raw
//! contents that lie about their length, and garbage under a valid proto-name, interleaved with
//! good requests, through kafka-infer to a REST model (so every record is transcoded). Each
//! hostile record gets exactly one error record with its kind, each good one its answer, in
//! order; the process stays alive and its peak RSS stays small.

use std::time::Duration;

use anyhow::{Context, Result};
use base64::{Engine, engine::general_purpose::STANDARD as B64};
use bytes::Bytes;
use codec::Transcoder;
use kafka_infer_tests::{
    Answer, Broker,
    models::{self, KafkaInfer},
    read_topic, unique,
};
use kafka_io::{Cluster, OutRecord, Producer, ProducerConfig};
use serde_json::{Value, json};

/// Peak resident memory the bridge may reach (VmHWM). A debug build serving these records
/// stays far below; expanding even the smallest hostile tensor (8 million values from one)
/// would take over 250 MB.
const PEAK_RSS_LIMIT_KB: u64 = 200 * 1024;

/// One input record: good (`None`: its answer is checked) or hostile with the error kind it
/// must get.
struct Rec {
    what: &'static str,
    kind: Option<&'static str>,
    value: Bytes,
}

fn good(value: Bytes) -> Rec {
    Rec {
        what: "good",
        kind: None,
        value,
    }
}

fn bad(what: &'static str, kind: &'static str, value: impl Into<Bytes>) -> Rec {
    Rec {
        what,
        kind: Some(kind),
        value: value.into(),
    }
}

/// Bytes that do not decode as any message: a length-delimited field 1 claiming ~2 MB.
const GARBAGE: &[u8] = b"\x0a\xff\xff\xff\x7f garbage";

fn encode(message: &str, v: Value) -> Bytes {
    Transcoder::default()
        .from_proto_json(message, v)
        .unwrap_or_else(|e| panic!("{message}: {e}"))
}

/// Good requests and hostile ones, alternating (good first and last).
fn interleave(good: Vec<Rec>, hostile: Vec<Rec>) -> Vec<Rec> {
    let mut out = Vec::new();
    let mut good = good.into_iter();
    for h in hostile {
        out.extend(good.next());
        out.push(h);
    }
    out.extend(good);
    out
}

/// Runs `recs` (all with `proto-name: message`) through kafka-infer in front of the project's
/// model server speaking `protocol` over REST; returns the answers in input order after
/// checking one answer per record, error kinds, liveness and peak RSS.
async fn through(
    protocol: &str,
    message: &'static str,
    recs: Vec<Rec>,
    extra_env: &[(&str, String)],
) -> Result<Vec<(usize, Value)>> {
    let broker = Broker::start()?;
    let model = models::test_model(protocol, "m", "echo")?;
    let (input, output, group) = (unique("in"), unique("out"), unique("g"));
    broker.create_topic(&input, 1)?;
    broker.create_topic(&output, 1)?;
    let url = model.rest_url();
    let mut env = vec![
        ("KAFKA_BROKER", broker.bootstrap()),
        ("KAFKA_INPUT_TOPIC", input.clone()),
        ("KAFKA_OUTPUT_TOPIC", output.clone()),
    ];
    env.extend(extra_env.iter().cloned());
    let ki = KafkaInfer::start(
        &[
            "--protocol",
            protocol,
            "--transport",
            "rest",
            "--model",
            &url,
            "--model-name",
            "m",
            "--session-timeout",
            "4s",
            "--group-id",
            &group,
        ],
        &env,
    )?;

    let cluster = Cluster::connect(broker.settings()).await?;
    let p = Producer::new(cluster, ProducerConfig::default());
    let mut deliveries = Vec::new();
    for (i, r) in recs.iter().enumerate() {
        let headers = vec![
            (
                "proto-name".to_string(),
                Bytes::from_static(message.as_bytes()),
            ),
            ("n".to_string(), Bytes::from(i.to_string())),
        ];
        let rec = OutRecord {
            key: Some(Bytes::from_static(b"k")),
            value: Some(r.value.clone()),
            headers,
        };
        deliveries.push(p.send(&input, None, rec).await?);
    }
    for d in deliveries {
        d.wait().await?;
    }
    p.close(Duration::from_secs(5)).await?;

    let answers: Vec<Answer> = read_topic(&broker.bootstrap(), &output, recs.len(), 30)?;
    assert_eq!(
        answers.len(),
        recs.len(),
        "exactly one record out per record in"
    );
    let mut good = Vec::new();
    for (i, (a, r)) in answers.iter().zip(&recs).enumerate() {
        assert_eq!(
            a.headers.get("n").map(String::as_str),
            Some(i.to_string().as_str()),
            "answers in input order"
        );
        let kind = a.headers.get("kafka-infer-error-kind").map(String::as_str);
        assert_eq!(
            kind,
            r.kind,
            "record {i} ({}): {:?}",
            r.what,
            a.headers.get("kafka-infer-error")
        );
        if r.kind.is_some() {
            assert!(
                a.headers
                    .get("kafka-infer-error")
                    .is_some_and(|e| !e.is_empty()),
                "record {i}: the reason is given"
            );
        } else {
            let name = a
                .headers
                .get("proto-name")
                .with_context(|| format!("answer {i} is not protobuf"))?;
            let v = Transcoder::default()
                .to_proto_json(name, &a.value, false)
                .with_context(|| format!("answer {i}: {name}"))?;
            good.push((i, v));
        }
    }

    // Nothing more comes (no second answer for any record).
    let again = read_topic(&broker.bootstrap(), &output, recs.len() + 1, 3)?;
    assert_eq!(again.len(), recs.len(), "no record answered twice");

    assert!(ki.proc.is_running_shared(), "kafka-infer is still running");
    let pid = ki.proc.pid();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let peak_kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("VmHWM in /proc/PID/status")?;
    assert!(
        peak_kb < PEAK_RSS_LIMIT_KB,
        "peak RSS {peak_kb} kB, over {PEAK_RSS_LIMIT_KB} kB"
    );
    eprintln!("{protocol}: peak RSS {} MB", peak_kb / 1024);
    Ok(good)
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap_or_else(|| panic!("not a list: {v}"))
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

// ---------------------------------------------------------------- TensorFlow

const TF_REQ: &str = "tensorflow.serving.PredictRequest";

fn tf(dims: &[i64], rest: Value) -> Bytes {
    let mut t = json!({"dtype": "DT_FLOAT", "tensor_shape": {"dim": dims.iter().map(|d| json!({"size": d})).collect::<Vec<_>>()}});
    for (k, v) in rest.as_object().unwrap() {
        t[k] = v.clone();
    }
    encode(
        TF_REQ,
        json!({"model_spec": {"name": "m"}, "inputs": {"x": t}}),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tensorflow_hostile_records_get_one_error_each() -> Result<()> {
    let one = || json!({"float_val": [1.5]});
    let hostile = vec![
        bad(
            "one value for 2^40",
            "tensor-too-large",
            tf(&[1 << 40], one()),
        ),
        bad(
            "one value for 8M",
            "tensor-too-large",
            tf(&[8_000_000], one()),
        ),
        bad(
            "2^64+ elements",
            "tensor-too-large",
            tf(&[1 << 62, 1 << 62, 4], one()),
        ),
        // Fine under the default limit, not under the 1 MiB this bridge runs with.
        bad(
            "over --max-tensor-bytes",
            "tensor-too-large",
            tf(&[1, 128, 128, 3], one()),
        ),
        bad(
            "5 values for 6",
            "bad-shape",
            tf(&[2, 3], json!({"float_val": [1, 2, 3, 4, 5]})),
        ),
        bad(
            "content for 2 of 3",
            "bad-shape",
            tf(&[3], json!({"tensor_content": B64.encode([0u8; 8])})),
        ),
        bad("negative dimension", "bad-shape", tf(&[-1, 2], one())),
        bad("garbage", "bad-protobuf", GARBAGE),
    ];
    let good: Vec<Rec> = (0..hostile.len() + 1)
        .map(|i| self::good(tf(&[1, 2], json!({"float_val": [i as f64, 0.5]}))))
        .collect();
    let answers = through(
        "tensorflow",
        TF_REQ,
        interleave(good, hostile),
        &[("KAFKA_INFER_MAX_TENSOR_BYTES", (1 << 20).to_string())],
    )
    .await?;
    assert_eq!(answers.len(), 9);
    for (n, (i, v)) in answers.iter().enumerate() {
        assert_eq!(i / 2, n, "good records are the even ones");
        assert_eq!(
            floats(&v["outputs"]["outputs"]["float_val"]),
            [n as f64, 0.5],
            "answer {i}: {v}"
        );
    }
    Ok(())
}

// ---------------------------------------------------------------- Open Inference Protocol (v2)

const V2_REQ: &str = "inference.ModelInferRequest";

fn v2(shape: &[i64], datatype: &str, contents: Value, raw: Option<&[u8]>) -> Bytes {
    let mut v = json!({"model_name": "m", "inputs": [{"name": "x", "datatype": datatype, "shape": shape, "contents": contents}]});
    if let Some(r) = raw {
        v["raw_input_contents"] = json!([B64.encode(r)]);
    }
    encode(V2_REQ, v)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v2_hostile_records_get_one_error_each() -> Result<()> {
    let one = || json!({"fp32_contents": [1.5]});
    let mut claim = u32::MAX.to_le_bytes().to_vec();
    claim.extend_from_slice(b"abc");
    let hostile = vec![
        bad(
            "one value for 2^40",
            "bad-shape",
            v2(&[1 << 40], "FP32", one(), None),
        ),
        bad(
            "2^64+ elements",
            "tensor-too-large",
            v2(&[1 << 62, 1 << 62, 4], "FP32", one(), None),
        ),
        bad(
            "3 values for 4",
            "bad-shape",
            v2(&[2, 2], "FP32", json!({"fp32_contents": [1, 2, 3]}), None),
        ),
        bad(
            "raw bytes for 2 of 3",
            "bad-shape",
            v2(&[3], "FP32", json!({}), Some(&[0u8; 8])),
        ),
        bad(
            "raw BYTES claiming 4 GiB",
            "transcode",
            v2(&[1], "BYTES", json!({}), Some(&claim)),
        ),
        bad(
            "negative dimension",
            "bad-shape",
            v2(&[-1], "FP32", one(), None),
        ),
        bad("garbage", "bad-protobuf", GARBAGE),
    ];
    let good: Vec<Rec> = (0..hostile.len() + 1)
        .map(|i| {
            self::good(v2(
                &[2],
                "FP32",
                json!({"fp32_contents": [i as f64, 0.5]}),
                None,
            ))
        })
        .collect();
    let answers = through("v2", V2_REQ, interleave(good, hostile), &[]).await?;
    assert_eq!(answers.len(), 8);
    for (n, (i, v)) in answers.iter().enumerate() {
        assert_eq!(i / 2, n, "good records are the even ones");
        assert_eq!(
            floats(&v["outputs"][0]["contents"]["fp32_contents"]),
            [n as f64, 0.5],
            "answer {i}: {v}"
        );
    }
    Ok(())
}

// ---------------------------------------------------------------- Seldon

const SELDON: &str = "seldon.protos.SeldonMessage";

fn seldon_tensor(shape: Value, values: Value) -> Bytes {
    encode(
        SELDON,
        json!({"data": {"names": ["a", "b"], "tensor": {"shape": shape, "values": values}}}),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seldon_hostile_records_get_one_error_each() -> Result<()> {
    let hostile = vec![
        bad(
            "one value for 2^60",
            "bad-shape",
            seldon_tensor(json!([1 << 30, 1 << 30]), json!([1.5])),
        ),
        bad(
            "tftensor: one value for 2^40",
            "tensor-too-large",
            encode(
                SELDON,
                json!({"data": {"tftensor": {"dtype": "DT_FLOAT", "tensor_shape": {"dim": [{"size": 1i64 << 40}]}, "float_val": [1.5]}}}),
            ),
        ),
        bad(
            "5 values for 6",
            "bad-shape",
            seldon_tensor(json!([2, 3]), json!([1, 2, 3, 4, 5])),
        ),
        bad(
            "negative dimension",
            "bad-shape",
            seldon_tensor(json!([-1, 2]), json!([1, 2])),
        ),
        bad("garbage", "bad-protobuf", GARBAGE),
    ];
    let good: Vec<Rec> = (0..hostile.len() + 1)
        .map(|i| self::good(seldon_tensor(json!([1, 2]), json!([i as f64, 0.5]))))
        .collect();
    let answers = through("seldon", SELDON, interleave(good, hostile), &[]).await?;
    assert_eq!(answers.len(), 6);
    for (n, (i, v)) in answers.iter().enumerate() {
        assert_eq!(i / 2, n, "good records are the even ones");
        assert_eq!(
            floats(&v["data"]["tensor"]["values"]),
            [n as f64, 0.5],
            "answer {i}: {v}"
        );
    }
    Ok(())
}
