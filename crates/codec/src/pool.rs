//! The descriptor pool: our protocol messages, compiled at build time, and any descriptor sets
//! a user adds for messages of their own.

use prost_reflect::{DescriptorPool, MessageDescriptor};

static BUILTIN: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/descriptors.bin"));

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("unknown proto-name `{0}`: no such message in the descriptor pool")]
    UnknownMessage(String),
    #[error("descriptor set {source_name}: {why}")]
    BadDescriptorSet { source_name: String, why: String },
}

#[derive(Clone, Debug)]
pub struct Pool {
    pool: DescriptorPool,
}

impl Default for Pool {
    fn default() -> Self {
        Self::builtin()
    }
}

impl Pool {
    /// The three protocols' messages and services.
    pub fn builtin() -> Self {
        Self {
            pool: DescriptorPool::decode(BUILTIN).expect("embedded descriptor set is valid"),
        }
    }

    /// Adds a compiled `FileDescriptorSet` (e.g. `protoc --include_imports -o set.bin`).
    pub fn add_descriptor_set(&mut self, bytes: &[u8], source_name: &str) -> Result<(), PoolError> {
        self.pool
            .decode_file_descriptor_set(bytes)
            .map_err(|e| PoolError::BadDescriptorSet {
                source_name: source_name.to_owned(),
                why: e.to_string(),
            })
    }

    pub fn message(&self, name: &str) -> Result<MessageDescriptor, PoolError> {
        self.pool
            .get_message_by_name(name.trim())
            .ok_or_else(|| PoolError::UnknownMessage(name.to_owned()))
    }

    /// Every message type in the pool (for tests and listings).
    pub fn all_messages(&self) -> impl Iterator<Item = MessageDescriptor> + '_ {
        self.pool.all_messages()
    }
}
