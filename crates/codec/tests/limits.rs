//! Hostile tensors in each protocol: huge shapes with one value, dimension products that
//! overflow, negative dimensions, shapes the values do not fill, raw contents that claim more
//! than they hold. Each is a typed error, found before anything of the claimed size is
//! allocated (a counting allocator watches the largest single allocation of this thread).

use std::{
    alloc::{GlobalAlloc, Layout, System},
    cell::Cell,
};

use base64::{Engine, engine::general_purpose::STANDARD as B64};
use bytes::Bytes;
use codec::{CodecError, Hints, Limits, Protocol, Transcoder};
use serde_json::{Value, json};

struct Counting;

thread_local! {
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    // try_with: the thread-local may be gone while a thread exits.
    let _ = LARGEST.try_with(|l| l.set(l.get().max(size)));
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Runs `f`; returns its result and the largest single allocation it made.
fn largest_allocation<T>(f: impl FnOnce() -> T) -> (T, usize) {
    LARGEST.with(|l| l.set(0));
    let r = f();
    (r, LARGEST.with(Cell::get))
}

const SMALL: usize = 1 << 20;

/// `bytes` (protobuf of `message`) -> REST JSON must fail with `kind`, allocating little.
fn rejects_proto(t: &Transcoder, p: Protocol, message: &str, bytes: &[u8], kind: &str) -> String {
    let h = Hints::default();
    let (r, big) = largest_allocation(|| t.proto_to_json(p, message, bytes, &h));
    let e = r.expect_err("a hostile tensor must be rejected");
    assert_eq!(e.kind(), kind, "{message}: {e}");
    assert!(
        big < SMALL,
        "{message}: allocated {big} bytes before failing ({e})"
    );
    e.to_string()
}

fn rejects_json(t: &Transcoder, p: Protocol, message: &str, json: &Value, kind: &str) -> String {
    let h = Hints {
        tf_input_name: Some("x".into()),
        ..Default::default()
    };
    let body = json.to_string();
    let (r, big) = largest_allocation(|| t.json_to_proto(p, message, body.as_bytes(), &h));
    let e = r.expect_err("a hostile tensor must be rejected");
    assert_eq!(e.kind(), kind, "{message}: {e}");
    assert!(
        big < SMALL,
        "{message}: allocated {big} bytes before failing ({e})"
    );
    e.to_string()
}

fn proto(t: &Transcoder, message: &str, v: Value) -> Bytes {
    t.from_proto_json(message, v).unwrap()
}

const TF_REQ: &str = "tensorflow.serving.PredictRequest";
const TF_RESP: &str = "tensorflow.serving.PredictResponse";

fn tf_input(dims: &[i64], extra: Value) -> Value {
    let mut t = json!({"dtype": "DT_FLOAT", "tensor_shape": {"dim": dims.iter().map(|d| json!({"size": d})).collect::<Vec<_>>()}});
    for (k, v) in extra.as_object().unwrap() {
        t[k] = v.clone();
    }
    json!({"model_spec": {"name": "m"}, "inputs": {"x": t}})
}

#[test]
fn tensorflow_hostile_tensors() {
    let t = Transcoder::default();
    let tf = Protocol::Tensorflow;
    let one = json!({"float_val": [1.0]});
    // Huge dims, one value (TensorFlow would broadcast it): 2^40 and 2^62 elements.
    let e = rejects_proto(
        &t,
        tf,
        TF_REQ,
        &proto(&t, TF_REQ, tf_input(&[1 << 40], one.clone())),
        "tensor-too-large",
    );
    assert!(e.contains("`x`") && e.contains("64 MiB"), "{e}");
    rejects_proto(
        &t,
        tf,
        TF_REQ,
        &proto(
            &t,
            TF_REQ,
            tf_input(&[1 << 20, 1 << 20, 1 << 22], one.clone()),
        ),
        "tensor-too-large",
    );
    // The product overflows 64 bits.
    let e = rejects_proto(
        &t,
        tf,
        TF_REQ,
        &proto(&t, TF_REQ, tf_input(&[1 << 62, 1 << 62, 16], one.clone())),
        "tensor-too-large",
    );
    assert!(e.contains("2^64"), "{e}");
    // Negative (unknown) dimension.
    let e = rejects_proto(
        &t,
        tf,
        TF_REQ,
        &proto(&t, TF_REQ, tf_input(&[-1, 3], one.clone())),
        "bad-shape",
    );
    assert!(e.contains("negative"), "{e}");
    // Shape and values disagree: 5 values for 6 elements, in float_val and in tensor_content.
    let e = rejects_proto(
        &t,
        tf,
        TF_REQ,
        &proto(
            &t,
            TF_REQ,
            tf_input(&[2, 3], json!({"float_val": [1, 2, 3, 4, 5]})),
        ),
        "bad-shape",
    );
    assert!(e.contains("needs 6 values, found 5"), "{e}");
    let raw: Vec<u8> = (0..5).flat_map(|i| (i as f32).to_le_bytes()).collect();
    rejects_proto(
        &t,
        tf,
        TF_REQ,
        &proto(
            &t,
            TF_REQ,
            tf_input(&[2, 3], json!({"tensor_content": B64.encode(&raw)})),
        ),
        "bad-shape",
    );
    // No elements but 2^40 empty rows to build; and 1000 dimensions of 1.
    rejects_proto(
        &t,
        tf,
        TF_REQ,
        &proto(&t, TF_REQ, tf_input(&[1 << 40, 0], json!({}))),
        "tensor-too-large",
    );
    rejects_proto(
        &t,
        tf,
        TF_REQ,
        &proto(&t, TF_REQ, tf_input(&[1; 1000], one.clone())),
        "bad-shape",
    );
    // A string broadcast: 64 KiB x 2^12 = 256 MiB of strings from one value.
    let s = B64.encode(vec![b'a'; 1 << 16]);
    let mut strings = tf_input(&[1 << 12], json!({"string_val": [s]}));
    strings["inputs"]["x"]["dtype"] = json!("DT_STRING");
    rejects_proto(
        &t,
        tf,
        TF_REQ,
        &proto(&t, TF_REQ, strings),
        "tensor-too-large",
    );
    // Each tensor under the limit, 64 of them over it together (a response this time): the
    // first ones are built, within the limit, then the message is refused.
    let limit = 4 << 20;
    let t = Transcoder::default().with_limits(Limits::new(limit));
    let outputs: serde_json::Map<String, Value> = (0..64)
        .map(|i| {
            (
                format!("o{i}"),
                json!({"dtype": "DT_FLOAT", "tensor_shape": {"dim": [{"size": 1 << 16}]}, "float_val": [0.5]}),
            )
        })
        .collect();
    let pb = proto(&t, TF_RESP, json!({"outputs": outputs}));
    let (r, big) = largest_allocation(|| t.proto_to_json(tf, TF_RESP, &pb, &Hints::default()));
    let e = r.unwrap_err();
    assert_eq!(e.kind(), "tensor-too-large");
    assert!(e.to_string().contains("per message"), "{e}");
    assert!(big <= limit as usize, "{big}");
}

#[test]
fn tensorflow_legitimate_tensors_still_pass() {
    let t = Transcoder::default();
    let h = Hints::default();
    // One value filling a 1x224x224x3 image (TensorFlow's broadcast), under the default limit.
    let pb = proto(
        &t,
        TF_REQ,
        tf_input(&[1, 224, 224, 3], json!({"float_val": [0.25]})),
    );
    let v: Value = serde_json::from_slice(
        &t.proto_to_json(Protocol::Tensorflow, TF_REQ, &pb, &h)
            .unwrap(),
    )
    .unwrap();
    assert_eq!(v["inputs"]["x"][0][223][223], json!([0.25, 0.25, 0.25]));
    // The largest tensor a 1 MiB record can carry (a million 1-byte values) fits the default.
    let raw = vec![7u8; 1 << 20];
    let mut big = tf_input(&[1 << 20], json!({"tensor_content": B64.encode(&raw)}));
    big["inputs"]["x"]["dtype"] = json!("DT_UINT8");
    let out = t
        .proto_to_json(Protocol::Tensorflow, TF_REQ, &proto(&t, TF_REQ, big), &h)
        .unwrap();
    let v: Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(v["inputs"]["x"].as_array().unwrap().len(), 1 << 20);
    // A smaller limit turns the same image away.
    let small = Transcoder::default().with_limits(Limits::new(1 << 20));
    rejects_proto(
        &small,
        Protocol::Tensorflow,
        TF_REQ,
        &pb,
        "tensor-too-large",
    );
}

const V2_REQ: &str = "inference.ModelInferRequest";
const V2_RESP: &str = "inference.ModelInferResponse";

fn v2_proto(t: &Transcoder, shape: &[i64], contents: Value, raw: Option<&[u8]>) -> Bytes {
    let mut v = json!({"model_name": "m", "inputs": [{"name": "x", "datatype": "FP32", "shape": shape, "contents": contents}]});
    if let Some(r) = raw {
        v["raw_input_contents"] = json!([B64.encode(r)]);
    }
    proto(t, V2_REQ, v)
}

#[test]
fn v2_hostile_tensors() {
    let t = Transcoder::default();
    let v2 = Protocol::V2;
    let one = json!({"fp32_contents": [1.0]});
    // Huge shape, one value: v2 never broadcasts.
    let e = rejects_proto(
        &t,
        v2,
        V2_REQ,
        &v2_proto(&t, &[1 << 40], one.clone(), None),
        "bad-shape",
    );
    assert!(e.contains("needs 1099511627776 values, found 1"), "{e}");
    rejects_proto(
        &t,
        v2,
        V2_REQ,
        &v2_proto(&t, &[1 << 62, 1 << 62], one.clone(), None),
        "tensor-too-large",
    );
    rejects_proto(
        &t,
        v2,
        V2_REQ,
        &v2_proto(&t, &[-1], one.clone(), None),
        "bad-shape",
    );
    rejects_proto(
        &t,
        v2,
        V2_REQ,
        &v2_proto(&t, &[2, 2], json!({"fp32_contents": [1, 2, 3]}), None),
        "bad-shape",
    );
    // Raw contents: 2 floats for 3 elements; a huge shape over 8 bytes; BYTES whose length
    // prefix claims 4 GiB.
    let two: Vec<u8> = [1f32, 2.0].iter().flat_map(|f| f.to_le_bytes()).collect();
    rejects_proto(
        &t,
        v2,
        V2_REQ,
        &v2_proto(&t, &[3], json!({}), Some(&two)),
        "bad-shape",
    );
    rejects_proto(
        &t,
        v2,
        V2_REQ,
        &v2_proto(&t, &[1 << 40], json!({}), Some(&two)),
        "bad-shape",
    );
    let mut claim = u32::MAX.to_le_bytes().to_vec();
    claim.extend_from_slice(b"abc");
    let pb = proto(
        &t,
        V2_REQ,
        json!({"inputs": [{"name": "s", "datatype": "BYTES", "shape": [1]}], "raw_input_contents": [B64.encode(&claim)]}),
    );
    let e = rejects_proto(&t, v2, V2_REQ, &pb, "transcode");
    assert!(e.contains("longer than the data"), "{e}");
    // Responses too.
    let pb = proto(
        &t,
        V2_RESP,
        json!({"outputs": [{"name": "y", "datatype": "INT64", "shape": [1i64 << 40], "contents": {"int64_contents": [1]}}]}),
    );
    rejects_proto(&t, v2, V2_RESP, &pb, "bad-shape");
    // REST JSON -> protobuf: shape and data must agree.
    let req = |shape: Value, data: Value| json!({"inputs": [{"name": "x", "datatype": "FP32", "shape": shape, "data": data}]});
    rejects_json(
        &t,
        v2,
        V2_REQ,
        &req(json!([1i64 << 40]), json!([1])),
        "bad-shape",
    );
    rejects_json(
        &t,
        v2,
        V2_REQ,
        &req(json!([2, 2]), json!([1, 2, 3])),
        "bad-shape",
    );
    rejects_json(&t, v2, V2_REQ, &req(json!([-4]), json!([1])), "bad-shape");
    rejects_json(
        &t,
        v2,
        V2_REQ,
        &req(json!([1i64 << 62, 1i64 << 62]), json!([1])),
        "tensor-too-large",
    );
    // And a legitimate raw tensor still passes.
    let pb = v2_proto(&t, &[1, 2], json!({}), Some(&two));
    let v: Value =
        serde_json::from_slice(&t.proto_to_json(v2, V2_REQ, &pb, &Hints::default()).unwrap())
            .unwrap();
    assert_eq!(v["inputs"][0]["data"], json!([1.0, 2.0]));
}

const SELDON: &str = "seldon.protos.SeldonMessage";

#[test]
fn seldon_hostile_tensors() {
    let t = Transcoder::default();
    let s = Protocol::Seldon;
    let tensor = |shape: Value, values: Value| json!({"data": {"tensor": {"shape": shape, "values": values}}});
    for (shape, values, kind) in [
        (json!([1 << 30, 1 << 30]), json!([1.0]), "bad-shape"),
        (
            json!([1 << 30, 1 << 30, 1 << 30]),
            json!([1.0]),
            "tensor-too-large",
        ),
        (json!([-1]), json!([1.0]), "bad-shape"),
        (json!([2, 3]), json!([1, 2, 3, 4, 5]), "bad-shape"),
    ] {
        let msg = tensor(shape, values);
        rejects_proto(&t, s, SELDON, &proto(&t, SELDON, msg.clone()), kind);
        rejects_json(&t, s, SELDON, &msg, kind);
    }
    // A tftensor inside a SeldonMessage: huge dims, one value.
    let msg = json!({"data": {"tftensor": {"dtype": "DT_FLOAT", "tensorShape": {"dim": [{"size": 1i64 << 40}]}, "floatVal": [1.0]}}});
    rejects_proto(
        &t,
        s,
        SELDON,
        &proto(&t, SELDON, msg.clone()),
        "tensor-too-large",
    );
    rejects_json(&t, s, SELDON, &msg, "tensor-too-large");
    // In a SeldonMessageList.
    let list = json!({"seldonMessages": [tensor(json!([1, 2]), json!([1, 2])), tensor(json!([4]), json!([1]))]});
    rejects_proto(
        &t,
        s,
        "seldon.protos.SeldonMessageList",
        &proto(&t, "seldon.protos.SeldonMessageList", list),
        "bad-shape",
    );
    // An ndarray nested 100 000 deep is refused by the protobuf decoder's recursion limit
    // (not a stack overflow). Each level: ListValue.values (field 1) holding a Value whose
    // list_value (field 6) holds the next level; lengths computed from the inside out.
    let depth = 100_000;
    let mut lens = vec![0usize; depth + 1]; // lens[k]: bytes of the ListValue k levels deep
    for k in (0..depth).rev() {
        let value = 1 + varint_len(lens[k + 1]) + lens[k + 1];
        lens[k] = 1 + varint_len(value) + value;
    }
    let mut inner = Vec::with_capacity(lens[0]);
    for l in &lens[1..] {
        inner.push(0x0a);
        push_len(&mut inner, 1 + varint_len(*l) + l);
        inner.push(0x32);
        push_len(&mut inner, *l);
    }
    assert_eq!(inner.len(), lens[0]);
    // DefaultData.ndarray (3) in SeldonMessage.data (3).
    let mut data = vec![0x1a];
    push_len(&mut data, inner.len());
    data.extend_from_slice(&inner);
    let mut msg = vec![0x1a];
    push_len(&mut msg, data.len());
    msg.extend_from_slice(&data);
    let e: CodecError = t
        .proto_to_json(s, SELDON, &msg, &Hints::default())
        .unwrap_err();
    assert_eq!(e.kind(), "bad-protobuf", "{e}");
    // Legitimate tensors pass both ways.
    let ok = tensor(json!([2, 1]), json!([1.5, 2.5]));
    let pb = t
        .json_to_proto(s, SELDON, ok.to_string().as_bytes(), &Hints::default())
        .unwrap();
    assert!(t.proto_to_json(s, SELDON, &pb, &Hints::default()).is_ok());
}

fn push_len(out: &mut Vec<u8>, mut n: usize) {
    loop {
        let b = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            out.push(b);
            return;
        }
        out.push(b | 0x80);
    }
}

fn varint_len(n: usize) -> usize {
    let mut v = Vec::new();
    push_len(&mut v, n);
    v.len()
}
