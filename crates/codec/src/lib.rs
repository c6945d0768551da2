//! codec: the protocols and payloads of kafka-infer. No I/O.
//!
//! Owns: the descriptor pool of proto/ (plus user descriptor sets), deciding what a record's
//! value is (`proto-name` header => protobuf of that message, else JSON), and transcoding
//! between each protocol's REST JSON and its protobuf messages. Knows nothing of Kafka or HTTP.

pub mod pool;

pub use pool::{Pool, PoolError};
