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
pub use transcode::{Hints, Transcoder};
