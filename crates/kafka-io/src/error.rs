//! Typed errors of kafka-io. Messages name the setting or the broker call that failed and never
//! carry secrets.

use std::time::Duration;

use kafka_protocol::error::ResponseError;

/// A setting that is missing or wrong: found at start-up, before any connection.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{0} is not set")]
    Missing(&'static str),
    #[error("{setting}: {why}")]
    Invalid { setting: &'static str, why: String },
}

/// A TLS setting that cannot be turned into a working client configuration.
#[derive(Debug, thiserror::Error)]
#[error("{setting}: {why}")]
pub struct TlsError {
    /// The setting(s) at fault, e.g. `KAFKA_SSL_CLIENT_KEY / KAFKA_SSL_CLIENT_KEY_FILE`.
    pub setting: &'static str,
    pub why: String,
}

/// Anything that goes wrong talking to the cluster.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("cannot reach broker {broker}: {why}")]
    Connect { broker: String, why: String },
    /// The TLS handshake failed over a certificate: the broker's is not trusted by our CA
    /// (`setting` names it), or the broker refused ours. Retryable (a certificate being
    /// rotated), but at start-up a settings mistake: see [`Error::is_certificate_problem`].
    #[error("cannot reach broker {broker}: TLS handshake failed: {why} (check {setting})")]
    Certificate {
        broker: String,
        setting: &'static str,
        why: String,
    },
    #[error("{call} to {broker} timed out after {after:?}")]
    Timeout {
        call: &'static str,
        broker: String,
        after: Duration,
    },
    #[error("connection to {broker} failed during {call}: {why}")]
    Io {
        call: &'static str,
        broker: String,
        why: String,
    },
    #[error("{call}: the broker answered {error:?} ({code}){}", .message.as_deref().map(|m| format!(": {m}")).unwrap_or_default())]
    Broker {
        call: &'static str,
        code: i16,
        error: ResponseError,
        message: Option<String>,
    },
    #[error("SASL {mechanism} authentication failed: {why}")]
    Sasl {
        mechanism: &'static str,
        why: String,
    },
    /// No OAUTHBEARER token could be had (token endpoint down or refusing the client, token
    /// file unreadable or expired); `setting` names the setting to check.
    #[error("{setting}: cannot get an OAUTHBEARER token: {why}")]
    Token { setting: &'static str, why: String },
    /// A SCRAM server asked for a PBKDF2 iteration count outside what we accept (see
    /// [`crate::sasl::SCRAM_ITERATIONS`]); nothing was derived.
    #[error(
        "SASL {mechanism} authentication refused: the broker asks for {count} PBKDF2 iterations; \
         kafka-infer accepts {min} to {max} (fewer make the password cheap to crack offline, more \
         would stall the process)"
    )]
    ScramIterations {
        mechanism: &'static str,
        count: u64,
        min: u64,
        max: u64,
    },
    #[error("{call}: broker supports no common version (ours {ours}, its {theirs})")]
    Version {
        call: &'static str,
        ours: String,
        theirs: String,
    },
    #[error("{call}: could not encode or decode: {why}")]
    Protocol { call: &'static str, why: String },
    #[error("rskafka: {0}")]
    Client(#[from] rskafka::client::error::Error),
    #[error("the consumer is closed")]
    Closed,
    #[error("topic {0} does not exist")]
    UnknownTopic(String),
    /// A record the producer refuses before sending (too large for its topic).
    #[error(transparent)]
    Produce(#[from] crate::producer::ProduceError),
}

impl Error {
    /// True when the same call may succeed later (network, coordinator moves, timeouts).
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Connect { .. }
            | Error::Certificate { .. }
            | Error::Timeout { .. }
            | Error::Io { .. } => true,
            Error::Broker { error, .. } => {
                error.is_retriable()
                    || matches!(
                        error,
                        ResponseError::NotCoordinator
                            | ResponseError::CoordinatorNotAvailable
                            | ResponseError::CoordinatorLoadInProgress
                    )
            }
            Error::Client(_) => true,
            _ => false,
        }
    }

    /// A certificate the TLS handshake refused (ours or the broker's): worth stopping for at
    /// start-up, where it is almost always a wrong CA or client certificate.
    pub fn is_certificate_problem(&self) -> bool {
        matches!(self, Error::Certificate { .. })
    }

    /// The broker answered OFFSET_OUT_OF_RANGE (the offset is before the log start or past
    /// its end).
    pub fn is_offset_out_of_range(&self) -> bool {
        self.broker_error() == Some(ResponseError::OffsetOutOfRange)
    }

    /// The broker's error code, when the broker answered with one.
    pub fn broker_error(&self) -> Option<ResponseError> {
        match self {
            Error::Broker { error, .. } => Some(*error),
            _ => None,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
