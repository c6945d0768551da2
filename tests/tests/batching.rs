//! Micro-batching end to end (`--batch-size`): records queued before kafka-infer starts are
//! merged into model requests (checked from `kafka_infer_batch_size` and the model call count),
//! and every record still gets exactly its own answer, in order, with its key and headers; a
//! poison record inside a batch gets an error record and the others their answers.
//! v2 with MLServer (REST and gRPC), seldon with Seldon's Python wrapper, tensorflow with the
//! TF stand-in.

use std::collections::BTreeMap;

use anyhow::Result;
use bytes::Bytes;
use kafka_infer_tests::{
    Answer, Broker,
    models::{self, KafkaInfer},
    read_topic, unique,
};
use kafka_infer_tests::{kafka_env, produce_all, seldon_deployment};
use kafka_io::OutRecord;
use serde_json::{Value, json};

const BATCH: &str = "8";

/// A one-model deployment; `topics`: input, output, error.
fn deployment(
    protocol: &str,
    transport: &str,
    node: &str,
    port: u16,
    b: &Broker,
    (input, output, error): (&str, &str, &str),
) -> String {
    let mut env = kafka_env(b, input, output);
    env.push(("KAFKA_ERROR_TOPIC", error.to_owned()));
    seldon_deployment(
        protocol,
        transport,
        &env,
        &format!("{{name: {node}, type: MODEL, endpoint: {{service_port: {port}}}}}"),
    )
}

/// What a run gave: answers by record index, error records by index, batch-size mean, model
/// calls.
struct Outcome {
    answers: BTreeMap<usize, (Answer, Value)>,
    errors: BTreeMap<usize, Answer>,
    mean_batch: f64,
    calls: f64,
}

/// Produces `values` (keys k{i % 3}, header idx = i) before kafka-infer starts, then runs it
/// with batching on and reads every record's answer, and the error records of the `poison`
/// ones.
async fn run(
    protocol: &str,
    transport: &str,
    node: &str,
    port: u16,
    values: &[Value],
    poison: &[usize],
) -> Result<Outcome> {
    run_on(
        protocol,
        transport,
        node,
        port,
        values,
        poison,
        (2, 3, BATCH),
    )
    .await
}

/// [`run`] on topics of `partitions`, with keys k{i % keys}, batches of `batch`.
async fn run_on(
    protocol: &str,
    transport: &str,
    node: &str,
    port: u16,
    values: &[Value],
    poison: &[usize],
    (partitions, keys, batch): (u32, usize, &str),
) -> Result<Outcome> {
    let broker = Broker::start()?;
    let (input, output, error) = (unique("in"), unique("out"), unique("err"));
    for t in [&input, &output, &error] {
        broker.create_topic(t, partitions)?;
    }
    let records = values
        .iter()
        .enumerate()
        .map(|(i, v)| OutRecord {
            key: Some(Bytes::from(format!("k{}", i % keys))),
            value: Some(Bytes::from(v.to_string())),
            headers: vec![("idx".into(), Bytes::from(i.to_string()))],
        })
        .collect();
    produce_all(broker.settings(), &input, records).await?;
    let dir = tempfile::tempdir()?;
    let yaml = dir.path().join("sdep.yaml");
    std::fs::write(
        &yaml,
        deployment(
            protocol,
            transport,
            node,
            port,
            &broker,
            (&input, &output, &error),
        ),
    )?;
    let ki = KafkaInfer::start(
        &[
            "-f",
            yaml.to_str().unwrap(),
            "--session-timeout",
            "4s",
            "--batch-size",
            batch,
            "--batch-linger",
            "20ms",
        ],
        &[],
    )?;
    let n_err = poison.len();
    let out = read_topic(&broker.bootstrap(), &output, values.len() - n_err, 60)?;
    let errs = if n_err > 0 {
        read_topic(&broker.bootstrap(), &error, n_err, 30)?
    } else {
        Vec::new()
    };
    let mut answers = BTreeMap::new();
    for a in out {
        let i: usize = a.headers["idx"].parse()?;
        let v: Value = serde_json::from_slice(&a.value)?;
        assert!(
            answers.insert(i, (a, v)).is_none(),
            "record {i} answered twice"
        );
    }
    let mut errors = BTreeMap::new();
    for a in errs {
        let i: usize = a.headers["idx"].parse()?;
        assert!(
            errors.insert(i, a).is_none(),
            "record {i} has two error records"
        );
    }
    assert_eq!(
        answers.len() + errors.len(),
        values.len(),
        "every record ends as one record"
    );
    // Order: one key's answers come in input order.
    let mut last: BTreeMap<String, (i64, usize)> = BTreeMap::new();
    for (i, (a, _)) in &answers {
        assert_eq!(a.key, format!("k{}", i % keys), "key kept");
        if let Some((off, j)) = last.get(&a.key) {
            assert!(*off < a.offset && j < i, "order broken for key {}", a.key);
        }
        last.insert(a.key.clone(), (a.offset, *i));
    }
    let sum = ki.metric("kafka_infer_batch_size_sum").unwrap_or(0.0);
    let count = ki.metric("kafka_infer_batch_size_count").unwrap_or(0.0);
    let calls = ki
        .metric("kafka_infer_model_request_duration_seconds_count")
        .unwrap_or(0.0);
    Ok(Outcome {
        answers,
        errors,
        mean_batch: if count > 0.0 { sum / count } else { 0.0 },
        calls,
    })
}

fn assert_batched(o: &Outcome, records: usize) {
    eprintln!(
        "mean batch {:.2}, {} model calls for {records} records",
        o.mean_batch, o.calls
    );
    assert!(
        o.mean_batch > 2.0,
        "records were merged: mean batch {}",
        o.mean_batch
    );
    assert!(
        o.calls < records as f64,
        "fewer model calls ({}) than records ({records})",
        o.calls
    );
}

/// v2: rows [i, i + 0.5] (every fifth record two rows), one poison record (a string where FP32
/// values go) among them; MLServer's doubler doubles each input.
async fn v2(transport: &str) -> Result<()> {
    let m = models::mlserver()?;
    let n = 48;
    let values: Vec<Value> = (0..n)
        .map(|i| {
            let f = i as f64;
            if i == 21 {
                // Merges by shape, but the model refuses it.
                return json!({"id": format!("r{i}"), "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 2], "data": ["bad", 1.0]}]});
            }
            if i % 5 == 0 {
                json!({"id": format!("r{i}"), "inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 2], "data": [[f, f + 0.5], [f + 1.0, f + 1.5]]}]})
            } else {
                json!({"id": format!("r{i}"), "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 2], "data": [f, f + 0.5]}]})
            }
        })
        .collect();
    let port = if transport == "rest" {
        m.http_port
    } else {
        m.grpc_port
    };
    let o = run("v2", transport, "doubler", port, &values, &[21]).await?;
    for (i, (_, v)) in &o.answers {
        let f = *i as f64;
        let want: Vec<f64> = if i % 5 == 0 {
            vec![2.0 * f, 2.0 * f + 1.0, 2.0 * f + 2.0, 2.0 * f + 3.0]
        } else {
            vec![2.0 * f, 2.0 * f + 1.0]
        };
        let out = &v["outputs"][0];
        let mut got = Vec::new();
        flatten(&out["data"], &mut got);
        assert_eq!(got, want, "record {i}: {v}");
        assert_eq!(
            out["shape"][0],
            json!(if i % 5 == 0 { 2 } else { 1 }),
            "record {i}: rows"
        );
        assert_eq!(v["id"], json!(format!("r{i}")), "record {i}: its own id");
    }
    assert_eq!(
        o.errors.keys().copied().collect::<Vec<_>>(),
        [21],
        "only the poison record fails"
    );
    assert_batched(&o, n);
    Ok(())
}

fn flatten(v: &Value, out: &mut Vec<f64>) {
    match v {
        Value::Array(a) => a.iter().for_each(|x| flatten(x, out)),
        x => out.push(x.as_f64().unwrap_or(f64::NAN)),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn v2_batches_over_rest_with_mlserver() -> Result<()> {
    v2("rest").await
}

#[tokio::test(flavor = "multi_thread")]
async fn v2_batches_over_grpc_with_mlserver() -> Result<()> {
    v2("grpc").await
}

/// seldon: ndarray rows times 10 (Seldon's wrapper, the Scaler model); a row with a string
/// makes the model fail.
#[tokio::test(flavor = "multi_thread")]
async fn seldon_batches_over_rest_with_the_python_wrapper() -> Result<()> {
    let m = models::seldon("Scaler", "MODEL")?;
    let n = 40;
    let values: Vec<Value> = (0..n)
        .map(|i| {
            if i == 13 {
                json!({"data": {"ndarray": [["x", "y"]]}})
            } else {
                json!({"data": {"ndarray": [[i as f64, 1.0]]}})
            }
        })
        .collect();
    let o = run("seldon", "rest", "scaler", m.http_port, &values, &[13]).await?;
    for (i, (_, v)) in &o.answers {
        assert_eq!(
            v["data"]["ndarray"],
            json!([[*i as f64 * 10.0, 10.0]]),
            "record {i}: {v}"
        );
    }
    assert_eq!(o.errors.keys().copied().collect::<Vec<_>>(), [13]);
    assert_batched(&o, n);
    Ok(())
}

/// `values` through the TF stand-in's echo model over REST (no poison records).
async fn tf_echo(values: &[Value], layout: (u32, usize, &str)) -> Result<Outcome> {
    let m = models::test_model("tensorflow", "echo", "echo")?;
    run_on(
        "tensorflow",
        "rest",
        "echo",
        m.http_port,
        values,
        &[],
        layout,
    )
    .await
}

/// tensorflow: `instances` rows through the TF stand-in's echo model (each record must get back
/// exactly its own rows).
#[tokio::test(flavor = "multi_thread")]
async fn tensorflow_batches_over_rest_with_the_tf_stand_in() -> Result<()> {
    let n = 40;
    let values: Vec<Value> = (0..n)
        .map(|i| {
            let f = i as f64;
            if i % 4 == 0 {
                json!({"instances": [[f, 0.5], [f, 1.5]]})
            } else {
                json!({"instances": [[f, 0.25]]})
            }
        })
        .collect();
    let o = tf_echo(&values, (2, 3, BATCH)).await?;
    for (i, (_, v)) in &o.answers {
        assert_eq!(v["predictions"], values[*i]["instances"], "record {i}: {v}");
    }
    assert_batched(&o, n);
    Ok(())
}

/// tensorflow: the columnar format (`inputs` named, as TF Serving takes it) through the TF
/// stand-in's echo model, which answers `outputs` as one array (a model of one output): each
/// record must get back exactly its own rows.
#[tokio::test(flavor = "multi_thread")]
async fn tensorflow_columnar_inputs_batch_over_rest() -> Result<()> {
    let n = 40;
    let values: Vec<Value> = (0..n)
        .map(|i| {
            let f = i as f64;
            if i % 3 == 0 {
                json!({"inputs": {"x": [[f, 0.5], [f, 1.5]]}})
            } else {
                json!({"inputs": {"x": [[f, 0.25]]}})
            }
        })
        .collect();
    let o = tf_echo(&values, (2, 3, BATCH)).await?;
    for (i, (_, v)) in &o.answers {
        assert_eq!(v["outputs"], values[*i]["inputs"]["x"], "record {i}: {v}");
    }
    assert_batched(&o, n);
    Ok(())
}

/// Batches take records of every partition: 64 records over 8 partitions, queued before
/// kafka-infer starts, need fewer model calls than there are partitions with records (batching
/// within a partition alone needs at least one call per partition).
#[tokio::test(flavor = "multi_thread")]
async fn batches_merge_records_across_partitions() -> Result<()> {
    let n = 64;
    let values: Vec<Value> = (0..n)
        .map(|i| json!({"instances": [[i as f64, 0.5]]}))
        .collect();
    let o = tf_echo(&values, (8, 16, "32")).await?;
    for (i, (_, v)) in &o.answers {
        assert_eq!(v["predictions"], values[*i]["instances"], "record {i}: {v}");
    }
    let partitions: std::collections::BTreeSet<i64> =
        o.answers.values().map(|(a, _)| a.partition).collect();
    eprintln!(
        "{} model calls for {n} records on {} partitions (mean batch {:.2})",
        o.calls,
        partitions.len(),
        o.mean_batch
    );
    assert!(partitions.len() >= 4, "records spread: {partitions:?}");
    assert!(
        o.calls < partitions.len() as f64,
        "{} model calls for records on {} partitions",
        o.calls,
        partitions.len()
    );
    Ok(())
}
