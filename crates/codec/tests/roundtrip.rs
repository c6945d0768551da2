//! Property tests: every message type of the pool round-trips protobuf -> JSON -> protobuf, and
//! the protocol transcoders keep tensors intact both ways.

use codec::{Hints, Pool, Protocol, Transcoder, detect};
use proptest::prelude::*;
use prost::Message as _;
use prost_reflect::{DynamicMessage, FieldDescriptor, Kind, MapKey, MessageDescriptor, Value};
use serde_json::json;

/// A small deterministic generator (proptest supplies the seed, so failures shrink to a seed).
struct Gen(u64);

impl Gen {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn string(&mut self) -> String {
        let n = self.below(6) as usize;
        (0..n)
            .map(|_| ["a", "Z", "é", "7", " ", "ß", "😀"][self.below(7) as usize])
            .collect()
    }
    fn finite(&mut self) -> f64 {
        (self.next() as i64 as f64) / 1e6
    }
}

fn scalar(g: &mut Gen, kind: &Kind, depth: u32) -> Option<Value> {
    Some(match kind {
        Kind::Double => Value::F64(g.finite()),
        Kind::Float => Value::F32(g.finite() as f32),
        Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 => Value::I32(g.next() as i32),
        Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 => Value::I64(g.next() as i64),
        Kind::Uint32 | Kind::Fixed32 => Value::U32(g.next() as u32),
        Kind::Uint64 | Kind::Fixed64 => Value::U64(g.next()),
        Kind::Bool => Value::Bool(g.below(2) == 1),
        Kind::String => Value::String(g.string()),
        Kind::Bytes => Value::Bytes(
            (0..g.below(8))
                .map(|_| g.next() as u8)
                .collect::<Vec<_>>()
                .into(),
        ),
        Kind::Enum(e) => {
            let vals: Vec<i32> = e.values().map(|v| v.number()).collect();
            Value::EnumNumber(vals[g.below(vals.len() as u64) as usize])
        }
        Kind::Message(m) => {
            if depth == 0 || m.full_name() == "google.protobuf.Any" {
                return None;
            }
            Value::Message(random_message(g, m, depth - 1))
        }
    })
}

fn map_key(g: &mut Gen, f: &FieldDescriptor) -> MapKey {
    match f.kind() {
        Kind::String => MapKey::String(g.string()),
        Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 => MapKey::I32(g.next() as i32),
        Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 => MapKey::I64(g.next() as i64),
        Kind::Uint32 | Kind::Fixed32 => MapKey::U32(g.next() as u32),
        Kind::Uint64 | Kind::Fixed64 => MapKey::U64(g.next()),
        Kind::Bool => MapKey::Bool(g.below(2) == 1),
        _ => unreachable!("map keys are scalars"),
    }
}

fn random_message(g: &mut Gen, desc: &MessageDescriptor, depth: u32) -> DynamicMessage {
    let mut msg = DynamicMessage::new(desc.clone());
    if desc.full_name() == "google.protobuf.Value" {
        // A Value holds exactly one kind (an empty one has no JSON form); nest only when deep.
        let fields: Vec<FieldDescriptor> = desc.fields().collect();
        let pick = if depth == 0 { g.below(4) } else { g.below(6) } as usize;
        let f = &fields[pick];
        let v = match f.kind() {
            Kind::Enum(_) => Value::EnumNumber(0),
            k => scalar(g, &k, depth).unwrap_or(Value::Bool(true)),
        };
        msg.set_field(f, v);
        return msg;
    }
    let mut oneofs_done = std::collections::HashSet::new();
    for f in desc.fields() {
        if g.below(3) == 0 {
            continue;
        }
        if let Some(o) = f.containing_oneof()
            && !oneofs_done.insert(o.full_name().to_owned())
        {
            continue;
        }
        if f.is_map() {
            let Kind::Message(entry) = f.kind() else {
                continue;
            };
            let (kf, vf) = (entry.map_entry_key_field(), entry.map_entry_value_field());
            let mut m = std::collections::HashMap::new();
            for _ in 0..g.below(3) {
                if let Some(v) = scalar(g, &vf.kind(), depth) {
                    m.insert(map_key(g, &kf), v);
                }
            }
            msg.set_field(&f, Value::Map(m));
        } else if f.is_list() {
            let items: Vec<Value> = (0..g.below(4))
                .filter_map(|_| scalar(g, &f.kind(), depth))
                .collect();
            msg.set_field(&f, Value::List(items));
        } else if let Some(v) = scalar(g, &f.kind(), depth) {
            msg.set_field(&f, v);
        }
    }
    msg
}

/// google.protobuf.Value holds exactly one kind; an empty one has no JSON form.
fn json_representable(desc: &MessageDescriptor) -> bool {
    desc.full_name() != "google.protobuf.Any" && !desc.is_map_entry()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn every_message_round_trips_through_json(seed in 1u64..u64::MAX) {
        let pool = Pool::builtin();
        let t = Transcoder::new(pool.clone());
        let mut g = Gen(seed);
        for desc in pool.all_messages().filter(json_representable) {
            let msg = random_message(&mut g, &desc, 3);
            let bytes = msg.encode_to_vec();
            let json = t.to_proto_json(desc.full_name(), &bytes, true)
                .unwrap_or_else(|e| panic!("{}: {e}", desc.full_name()));
            let back = t.from_proto_json(desc.full_name(), json.clone())
                .unwrap_or_else(|e| panic!("{}: {e}\n{json}", desc.full_name()));
            let a = DynamicMessage::decode(desc.clone(), bytes.as_slice()).unwrap();
            let b = DynamicMessage::decode(desc.clone(), back.as_ref()).unwrap();
            prop_assert_eq!(a, b, "{} via {}", desc.full_name(), json);
        }
    }

    #[test]
    fn v2_tensors_survive_rest_proto_rest(vals in proptest::collection::vec(-1e6f32..1e6, 1..40), rows in 1usize..4) {
        let n = vals.len() / rows * rows;
        prop_assume!(n > 0);
        let data: Vec<f32> = vals[..n].to_vec();
        let req = json!({"id": "r1", "inputs": [
            {"name": "x", "datatype": "FP32", "shape": [rows, n / rows], "data": data},
            {"name": "s", "datatype": "BYTES", "shape": [1], "data": ["héllo"]},
        ], "parameters": {"a": 1, "b": true, "c": "z", "d": 0.5}});
        let t = Transcoder::default();
        let h = Hints { model_name: Some("m".into()), ..Default::default() };
        let pb = t.json_to_proto(Protocol::V2, "inference.ModelInferRequest", req.to_string().as_bytes(), &h).unwrap();
        let back: serde_json::Value = serde_json::from_slice(
            &t.proto_to_json(Protocol::V2, "inference.ModelInferRequest", &pb, &h).unwrap()).unwrap();
        prop_assert_eq!(&back["model_name"], &json!("m"));
        prop_assert_eq!(&back["inputs"][1]["data"], &json!(["héllo"]));
        prop_assert_eq!(&back["parameters"], &req["parameters"]);
        let got: Vec<f32> = back["inputs"][0]["data"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect();
        prop_assert_eq!(got, data);
    }
}

#[test]
fn v2_raw_output_contents_become_data() {
    let t = Transcoder::default();
    let raw: Vec<u8> = [1.0f32, 2.5, -3.0, 4.0]
        .iter()
        .flat_map(|f| f.to_le_bytes())
        .collect();
    let resp = json!({"model_name": "m", "id": "7", "outputs": [{"name": "y", "datatype": "FP32", "shape": [2, 2]}],
                      "raw_output_contents": [base64_encode(&raw)]});
    let pb = t
        .from_proto_json("inference.ModelInferResponse", resp)
        .unwrap();
    let rest: serde_json::Value = serde_json::from_slice(
        &t.proto_to_json(
            Protocol::V2,
            "inference.ModelInferResponse",
            &pb,
            &Hints::default(),
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(rest["outputs"][0]["data"], json!([1.0, 2.5, -3.0, 4.0]));
    assert_eq!(rest["model_name"], json!("m"));
    assert_eq!(rest["id"], json!("7"));
}

fn base64_encode(b: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(b)
}

#[test]
fn tf_cifar10_rest_request_both_ways() {
    // {"instances": [<1x32x32x3 floats>]} as the Seldon cifar10 example sends it.
    let img: Vec<Vec<Vec<f32>>> = (0..32)
        .map(|i| {
            (0..32)
                .map(|j| {
                    (0..3)
                        .map(|k| ((i * 96 + j * 3 + k) % 255) as f32 / 255.0)
                        .collect()
                })
                .collect()
        })
        .collect();
    let req = json!({"instances": [img]});
    let t = Transcoder::default();
    let h = Hints {
        model_name: Some("resnet32".into()),
        tf_input_name: Some("input_1".into()),
        tf_row_format: true,
        ..Default::default()
    };
    let pb = t
        .json_to_proto(
            Protocol::Tensorflow,
            "tensorflow.serving.PredictRequest",
            req.to_string().as_bytes(),
            &h,
        )
        .unwrap();
    let v = t
        .to_proto_json("tensorflow.serving.PredictRequest", &pb, false)
        .unwrap();
    assert_eq!(v["model_spec"]["name"], json!("resnet32"));
    let dims: Vec<i64> = v["inputs"]["input_1"]["tensor_shape"]["dim"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["size"].as_i64().unwrap())
        .collect();
    assert_eq!(dims, [1, 32, 32, 3]);
    assert_eq!(v["inputs"]["input_1"]["dtype"], json!("DT_FLOAT"));
    let rest: serde_json::Value = serde_json::from_slice(
        &t.proto_to_json(
            Protocol::Tensorflow,
            "tensorflow.serving.PredictRequest",
            &pb,
            &h,
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(rest["inputs"]["input_1"], json!([img]));
}

#[test]
fn tf_tensor_content_and_response_formats() {
    let t = Transcoder::default();
    let raw: Vec<u8> = [0.25f32, 0.75]
        .iter()
        .flat_map(|f| f.to_le_bytes())
        .collect();
    let resp = json!({"outputs": {"scores": {"dtype": "DT_FLOAT", "tensor_shape": {"dim": [{"size": 1}, {"size": 2}]}, "tensor_content": base64_encode(&raw)}}});
    let pb = t
        .from_proto_json("tensorflow.serving.PredictResponse", resp)
        .unwrap();
    let row = Hints {
        tf_row_format: true,
        ..Default::default()
    };
    let rest: serde_json::Value = serde_json::from_slice(
        &t.proto_to_json(
            Protocol::Tensorflow,
            "tensorflow.serving.PredictResponse",
            &pb,
            &row,
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(rest, json!({"predictions": [[0.25, 0.75]]}));
    let col: serde_json::Value = serde_json::from_slice(
        &t.proto_to_json(
            Protocol::Tensorflow,
            "tensorflow.serving.PredictResponse",
            &pb,
            &Hints::default(),
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(col, json!({"outputs": [[0.25, 0.75]]}));
    // And the REST response back into a PredictResponse.
    let back = t
        .json_to_proto(
            Protocol::Tensorflow,
            "tensorflow.serving.PredictResponse",
            br#"{"predictions": [[1, 2, 3]]}"#,
            &row,
        )
        .unwrap();
    let v = t
        .to_proto_json("tensorflow.serving.PredictResponse", &back, false)
        .unwrap();
    assert_eq!(v["outputs"]["predictions"]["int64_val"], json!([1, 2, 3]));
}

#[test]
fn tf_unnamed_input_without_a_name_says_why() {
    let t = Transcoder::default();
    let e = t
        .json_to_proto(
            Protocol::Tensorflow,
            "tensorflow.serving.PredictRequest",
            br#"{"instances": [[1.0]]}"#,
            &Hints::default(),
        )
        .unwrap_err();
    assert!(e.to_string().contains("input name"), "{e}");
    let e = t
        .json_to_proto(
            Protocol::Tensorflow,
            "tensorflow.serving.PredictRequest",
            br#"{"instances": [[1.0], [2.0, 3.0]]}"#,
            &Hints {
                tf_input_name: Some("x".into()),
                ..Default::default()
            },
        )
        .unwrap_err();
    assert!(e.to_string().contains("ragged"), "{e}");
}

#[test]
fn seldon_all_data_kinds_both_ways() {
    let t = Transcoder::default();
    for body in [
        json!({"data": {"names": ["a", "b"], "ndarray": [[1.0, 2.0]]}}),
        json!({"data": {"names": ["a"], "tensor": {"shape": [2, 1], "values": [1.5, 2.5]}}}),
        json!({"strData": "hello"}),
        json!({"binData": "AAEC"}),
        json!({"jsonData": {"k": [1, "x", null, true]}}),
        json!({"meta": {"puid": "p1", "tags": {"t": "v"}}, "data": {"ndarray": ["s"]}}),
    ] {
        let pb = t
            .json_to_proto(
                Protocol::Seldon,
                "seldon.protos.SeldonMessage",
                body.to_string().as_bytes(),
                &Hints::default(),
            )
            .unwrap();
        let back: serde_json::Value = serde_json::from_slice(
            &t.proto_to_json(
                Protocol::Seldon,
                "seldon.protos.SeldonMessage",
                &pb,
                &Hints::default(),
            )
            .unwrap(),
        )
        .unwrap();
        assert_eq!(numbers_as_f64(back), numbers_as_f64(body));
    }
}

/// Protobuf keeps JSON numbers as doubles: compare 1 and 1.0 as equal.
fn numbers_as_f64(v: serde_json::Value) -> serde_json::Value {
    match v {
        serde_json::Value::Number(n) => json!(n.as_f64().unwrap()),
        serde_json::Value::Array(a) => {
            serde_json::Value::Array(a.into_iter().map(numbers_as_f64).collect())
        }
        serde_json::Value::Object(o) => {
            serde_json::Value::Object(o.into_iter().map(|(k, v)| (k, numbers_as_f64(v))).collect())
        }
        other => other,
    }
}

#[test]
fn wrong_protocol_and_garbage_are_typed_errors() {
    let t = Transcoder::default();
    let h = Hints::default();
    let e = t
        .json_to_proto(
            Protocol::V2,
            "inference.ModelInferRequest",
            br#"{"instances": [1]}"#,
            &h,
        )
        .unwrap_err();
    assert_eq!(e.kind(), "wrong-protocol");
    let e = t
        .json_to_proto(Protocol::V2, "inference.ModelInferRequest", b"[1,2", &h)
        .unwrap_err();
    assert_eq!(e.kind(), "malformed-json");
    let e = t
        .proto_to_json(
            Protocol::V2,
            "inference.ModelInferRequest",
            &[0x2a, 0x05, 0xff],
            &h,
        )
        .unwrap_err();
    assert_eq!(e.kind(), "bad-protobuf");
    // Truncated protobuf of a real request.
    let ok = t
        .json_to_proto(
            Protocol::V2,
            "inference.ModelInferRequest",
            br#"{"inputs": [{"name": "x", "datatype": "FP32", "shape": [2], "data": [1, 2]}]}"#,
            &h,
        )
        .unwrap();
    let cut = ok.slice(..ok.len() - 3);
    let headers = vec![(
        "proto-name".to_string(),
        bytes::Bytes::from_static(b"inference.ModelInferRequest"),
    )];
    assert_eq!(
        detect(&Pool::builtin(), cut, &headers).unwrap_err().kind(),
        "bad-protobuf"
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// The fuzz target's body on random bytes and on mutated valid payloads (stable smoke test;
    /// the coverage-guided run is `cargo fuzz run decode` in fuzz/).
    #[test]
    fn decode_path_never_panics(data in proptest::collection::vec(any::<u8>(), 0..512), sel in any::<u8>()) {
        let mut d = vec![sel];
        d.extend(&data);
        codec::fuzz_decode(&d);
        // A valid JSON request with one byte changed.
        let mut j = br#"{"inputs":[{"name":"x","shape":[2],"datatype":"FP32","data":[1,2]}],"instances":[[1]]}"#.to_vec();
        if !data.is_empty() {
            let i = data[0] as usize % j.len();
            j[i] = data[data.len() - 1];
        }
        let mut d = vec![sel];
        d.extend(j);
        codec::fuzz_decode(&d);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3000))]

    /// The `record` fuzz target's body on random messages of every type the pool knows, with
    /// a few bytes changed, and on random bytes (stable smoke test; the coverage-guided run is
    /// `cargo fuzz run record` in fuzz/).
    #[test]
    fn record_path_never_panics(
        seed in 1u64..u64::MAX,
        sel in any::<u8>(),
        edits in proptest::collection::vec((any::<u16>(), any::<u8>()), 0..4),
        noise in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        static MESSAGES: std::sync::OnceLock<Vec<MessageDescriptor>> = std::sync::OnceLock::new();
        let messages = MESSAGES.get_or_init(|| Pool::builtin().all_messages().collect());
        prop_assert!(messages.len() <= 256, "one byte picks the message");
        let desc = &messages[sel as usize % messages.len()];
        let mut bytes = random_message(&mut Gen(seed), desc, 3).encode_to_vec();
        for (at, b) in &edits {
            if !bytes.is_empty() {
                let i = *at as usize % bytes.len();
                bytes[i] = *b;
            }
        }
        let mut d = vec![sel];
        d.extend(&bytes);
        codec::fuzz_record(&d);
        let mut d = vec![sel];
        d.extend(&noise);
        codec::fuzz_record(&d);
    }
}

#[test]
fn tf_rows_of_named_tensors_stack_per_name() {
    let t = Transcoder::default();
    let h = Hints::default();
    let req = br#"{"instances": [{"a": [1.0, 2.0], "b": "x"}, {"a": [3.0, 4.0], "b": "y"}]}"#;
    let pb = t
        .json_to_proto(
            Protocol::Tensorflow,
            "tensorflow.serving.PredictRequest",
            req,
            &h,
        )
        .unwrap();
    let v = t
        .to_proto_json("tensorflow.serving.PredictRequest", &pb, false)
        .unwrap();
    assert_eq!(v["inputs"]["a"]["float_val"], json!([1.0, 2.0, 3.0, 4.0]));
    assert_eq!(
        v["inputs"]["a"]["tensor_shape"]["dim"],
        json!([{"size": 2}, {"size": 2}])
    );
    assert_eq!(v["inputs"]["b"]["dtype"], json!("DT_STRING"));
    let e = t
        .json_to_proto(
            Protocol::Tensorflow,
            "tensorflow.serving.PredictRequest",
            br#"{"instances": [{"a": 1}, {"c": 2}]}"#,
            &h,
        )
        .unwrap_err();
    assert!(e.to_string().contains("lacks `a`"), "{e}");
    let resp = br#"{"predictions": [{"s": 1, "l": "cat"}, {"s": 2, "l": "dog"}]}"#;
    let pb = t
        .json_to_proto(
            Protocol::Tensorflow,
            "tensorflow.serving.PredictResponse",
            resp,
            &h,
        )
        .unwrap();
    let v = t
        .to_proto_json("tensorflow.serving.PredictResponse", &pb, false)
        .unwrap();
    assert_eq!(v["outputs"]["s"]["int64_val"], json!([1, 2]));
    assert_eq!(v["outputs"]["l"]["dtype"], json!("DT_STRING"));
}
