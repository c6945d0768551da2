//! Typed errors of payload handling. Every one is final for its record (retrying the same bytes
//! gives the same answer) and says what is wrong in words a user can act on.

use crate::protocol::Protocol;

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error(
        "unknown proto-name `{0}`: no such message in the descriptor pool (add yours with --descriptor-set)"
    )]
    UnknownMessage(String),
    #[error("value is not a valid `{message}` protobuf: {why}")]
    BadProtobuf { message: String, why: String },
    #[error("value is not valid JSON: {0}")]
    MalformedJson(String),
    #[error("value is not a {protocol} request: {why}")]
    WrongProtocol { protocol: Protocol, why: String },
    #[error("cannot transcode: {0}")]
    Transcode(String),
    #[error("empty record value")]
    Empty,
    /// A tensor (or all tensors of one message) would take more memory once decoded than the
    /// configured limit ([`crate::Limits`]); checked before anything is allocated.
    #[error("tensor `{tensor}` is too large: {why}")]
    TensorTooLarge { tensor: String, why: String },
    /// A tensor's shape is not one: negative (unknown) dimensions, too many dimensions, or a
    /// number of values that does not fill it.
    #[error("tensor `{tensor}` has a bad shape: {why}")]
    BadShape { tensor: String, why: String },
}

impl CodecError {
    /// A short stable name for the `kafka-infer-error-kind` header and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::UnknownMessage(_) => "unknown-proto-name",
            Self::BadProtobuf { .. } => "bad-protobuf",
            Self::MalformedJson(_) => "malformed-json",
            Self::WrongProtocol { .. } => "wrong-protocol",
            Self::Transcode(_) => "transcode",
            Self::Empty => "empty",
            Self::TensorTooLarge { .. } => "tensor-too-large",
            Self::BadShape { .. } => "bad-shape",
        }
    }
}

impl From<crate::pool::PoolError> for CodecError {
    fn from(e: crate::pool::PoolError) -> Self {
        match e {
            // The name may come from a record's proto-name header.
            crate::pool::PoolError::UnknownMessage(n) => {
                Self::UnknownMessage(crate::text::printable(&n, crate::text::MAX_SUPPLIED))
            }
            other => Self::Transcode(other.to_string()),
        }
    }
}
