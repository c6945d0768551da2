//! codec: the protocols and payloads of kafka-infer. No I/O.
//!
//! Owns: the descriptor pool of proto/ (plus user descriptor sets), deciding what a record's
//! value is (`proto-name` header => protobuf of that message, else JSON), where a request goes
//! (REST paths, gRPC methods), and transcoding between each protocol's REST JSON and its
//! protobuf messages. Knows nothing of Kafka, HTTP or gRPC connections.

pub mod batch;
pub mod chain;
pub mod error;
pub mod payload;
pub mod pool;
pub mod protocol;
pub mod tensor;
pub mod text;
pub mod transcode;

pub use error::CodecError;
pub use payload::{Payload, detect};
pub use pool::{Pool, PoolError};
pub use protocol::{GrpcMethod, NodeType, Protocol, Transport, grpc_method, rest_path};
pub use tensor::Limits;
pub use transcode::{Hints, Transcoder};

/// The whole decode path on arbitrary input, for the fuzzer (fuzz/) and its stable smoke test:
/// payload detection under every kind of header, then transcoding both ways in every protocol.
/// It must return (with errors), never panic or hang.
pub fn fuzz_decode(data: &[u8]) {
    use bytes::Bytes;
    static T: std::sync::OnceLock<Transcoder> = std::sync::OnceLock::new();
    let t = T.get_or_init(fuzz_transcoder);
    let pool = &t.pool;
    let (selector, body) = data.split_first().map_or((0, data), |(s, b)| (*s, b));
    let names = [
        "inference.ModelInferRequest",
        "inference.ModelInferResponse",
        "tensorflow.serving.PredictRequest",
        "tensorflow.serving.PredictResponse",
        "seldon.protos.SeldonMessage",
        "seldon.protos.SeldonMessageList",
        "no.such.Message",
    ];
    let name = names[selector as usize % names.len()];
    let value = Bytes::copy_from_slice(body);
    let headers = match selector / 8 % 3 {
        0 => vec![],
        1 => vec![("proto-name".to_owned(), Bytes::from_static(name.as_bytes()))],
        _ => vec![(
            "content-type".to_owned(),
            Bytes::from_static(b"application/x-protobuf"),
        )],
    };
    let _ = detect(pool, value, &headers);
    let hints = Hints {
        model_name: Some("m".into()),
        tf_input_name: Some("x".into()),
        tf_row_format: selector % 2 == 0,
        ..Default::default()
    };
    for p in [Protocol::Seldon, Protocol::Tensorflow, Protocol::V2] {
        let _ = t.json_to_proto(p, name, body, &hints);
        let _ = t.proto_to_json(p, name, body, &hints);
    }
}

/// The fuzzers' transcoder: the default pool, a 4 MiB tensor limit (the same checks as the
/// default 64 MiB, with cheaper executions when a one-value tensor fills a large shape).
fn fuzz_transcoder() -> Transcoder {
    Transcoder::default().with_limits(Limits::new(4 << 20))
}

/// A record under every message name the pool knows, for the fuzzer (fuzz/) and its stable
/// smoke test: the first byte picks the `proto-name` header (in [`Pool::all_messages`] order),
/// the rest is the value. Detection, then, for a value that decodes, transcoding to each
/// protocol's REST JSON and that JSON back to protobuf. It must return (with errors), never
/// panic, hang, or allocate more than the limits allow.
pub fn fuzz_record(data: &[u8]) {
    use bytes::Bytes;
    static T: std::sync::OnceLock<(Transcoder, Vec<String>)> = std::sync::OnceLock::new();
    let (t, names) = T.get_or_init(|| {
        let t = fuzz_transcoder();
        let names = t
            .pool
            .all_messages()
            .map(|m| m.full_name().to_owned())
            .collect();
        (t, names)
    });
    let Some((selector, body)) = data.split_first() else {
        return;
    };
    let name = &names[*selector as usize % names.len()];
    let headers = vec![(
        payload::PROTO_NAME.to_owned(),
        Bytes::copy_from_slice(name.as_bytes()),
    )];
    if detect(&t.pool, Bytes::copy_from_slice(body), &headers).is_err() {
        return;
    }
    let hints = Hints {
        model_name: Some("m".into()),
        tf_input_name: Some("x".into()),
        tf_row_format: body.first().is_some_and(|b| b & 1 == 1),
        ..Default::default()
    };
    for p in [Protocol::Seldon, Protocol::Tensorflow, Protocol::V2] {
        if let Ok(json) = t.proto_to_json(p, name, body, &hints) {
            let _ = t.json_to_proto(p, name, &json, &hints);
        }
    }
}
