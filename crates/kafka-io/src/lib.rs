//! kafka-io: everything kafka-infer says to Kafka.
//!
//! Owns: connection settings (the `KAFKA_*` names), TLS material, SASL, consumer-group membership
//! (classic protocol), partition fetchers, the producer, offset tracking and commits, lag.
//! Knows nothing of models, payloads or protocols above Kafka: records are bytes.
//!
//! Data path (produce, fetch, metadata) runs on rskafka; the group APIs rskafka lacks run on our
//! own connection ([`conn`]) with kafka-protocol's message types.

pub mod assignor;
pub mod backoff;
pub mod cluster;
pub mod conn;
pub mod consumer;
pub mod error;
pub mod group;
pub mod offsets;
pub mod producer;
pub mod sasl;
pub mod secret;
pub mod settings;
pub mod tls;

pub use cluster::Cluster;
pub use consumer::{
    Acker, Batch, Consumer, ConsumerConfig, InRecord, OffsetReset, PartitionLag, PartitionStream,
    StreamState, Token,
};
pub use error::{ConfigError, Error, Result, TlsError};
pub use group::GroupConfig;
pub use producer::{CompressionCodec, Delivery, OutRecord, ProduceError, Producer, ProducerConfig};
pub use secret::Secret;
pub use settings::{
    ConnectionSettings, PemSource, SaslMechanism, SaslSettings, SecurityProtocol, TlsSettings,
};
