//! kafka-io: everything kafka-infer says to Kafka.
//!
//! Owns: connection settings (the `KAFKA_*` names), TLS material, SASL, consumer-group membership
//! (classic protocol), partition fetchers, the producer, offset tracking and commits, lag.
//! Knows nothing of models, payloads or protocols above Kafka: records are bytes.
//!
//! Partition counts, ListOffsets and CreateTopics run on rskafka. Everything on the record path
//! runs on our own connection ([`conn`]) with kafka-protocol's message types: the group APIs
//! rskafka lacks, the session (heartbeats, commits), the read_committed Fetch ([`fetch`]:
//! rskafka drops transaction markers without advancing and keeps aborted records) and the
//! idempotent producer ([`producer`]: rskafka writes producer id -1, copies every record and
//! resends throttled batches).

pub mod admin;
pub mod assignor;
pub mod aws;
pub mod backoff;
pub mod cluster;
pub mod conn;
pub mod consumer;
pub mod error;
pub mod fetch;
pub mod group;
pub mod oauth;
pub mod offsets;
pub mod producer;
pub mod sasl;
pub mod secret;
pub mod session;
pub mod settings;
pub mod tls;
pub mod txn;

pub use cluster::Cluster;
pub use consumer::{
    Acker, Batch, Consumer, ConsumerConfig, InRecord, OffsetReset, PartitionLag, PartitionStream,
    StreamState, Token, TxnPositions,
};
pub use error::{ConfigError, Error, Result, TlsError};
pub use group::GroupConfig;
pub use oauth::{OauthMethod, OauthSettings, TokenSource};
pub use producer::{
    CompressionCodec, Delivery, OnWritten, OutRecord, ProduceError, Producer, ProducerConfig,
};
pub use secret::Secret;
pub use settings::{
    ConnectionSettings, PemSource, SaslMechanism, SaslSettings, SecurityProtocol, TlsSettings,
};
pub use txn::{TxnConfig, TxnError, TxnOffsets};

/// The group metadata decoders on arbitrary bytes, for the fuzzer (fuzz/) and its stable smoke
/// test: the subscription and assignment bytes that other group members (any client) send
/// through the coordinator. They must return, never panic, hang or allocate what the bytes
/// merely claim; what they accept must survive our own encoding unchanged.
pub fn fuzz_group_metadata(data: &[u8]) {
    let bytes = bytes::Bytes::copy_from_slice(data);
    if let Ok(topics) = assignor::decode_subscription(bytes.clone()) {
        let again = assignor::decode_subscription(assignor::encode_subscription(&topics));
        assert_eq!(again.as_ref(), Ok(&topics), "subscription round trip");
    }
    if let Ok(tps) = assignor::decode_assignment(bytes) {
        let list: Vec<assignor::Tp> = tps.iter().cloned().collect();
        let again = assignor::decode_assignment(assignor::encode_assignment(&list));
        assert_eq!(again.as_ref(), Ok(&tps), "assignment round trip");
    }
}
