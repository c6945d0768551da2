//! codec: the protocols and payloads of kafka-infer. No I/O.
//!
//! Owns: the descriptor pool of proto/ (plus user descriptor sets), deciding what a record's
//! value is (`proto-name` header => protobuf of that message, else JSON), where a request goes
//! (REST paths, gRPC methods), and transcoding between each protocol's REST JSON and its
//! protobuf messages. Knows nothing of Kafka, HTTP or gRPC connections.

pub mod error;
pub mod payload;
pub mod pool;
pub mod protocol;
pub mod tensor;
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
    let t = T.get_or_init(Transcoder::default);
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
