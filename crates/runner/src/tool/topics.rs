//! What the tools read from Kafka without joining a group: partition counts, end offsets (the
//! fetch high watermark) and records, partition by partition, with no commits.

use std::{sync::Arc, time::Duration};

use anyhow::{Context, Result};
use kafka_io::{
    Cluster,
    cluster::bounded,
    fetch::{FetchedRecord, PartitionFetcher},
};
use rskafka::client::partition::OffsetAt;

use crate::config::Config;

/// Connects with the configured TLS/SASL (one attempt: a tool says why and stops).
pub async fn connect(cfg: &mut Config) -> Result<Arc<Cluster>> {
    cfg.connection.build_tls()?;
    Cluster::connect(cfg.connection.clone())
        .await
        .context("cannot connect to Kafka (KAFKA_BROKER, KAFKA_SECURITY_PROTOCOL, KAFKA_SSL_*, KAFKA_SASL_*)")
}

/// The partition count of `topic`; `setting` names where it came from in the error.
pub async fn partitions(cluster: &Cluster, topic: &str, setting: &str) -> Result<i32> {
    match cluster.partition_counts(&[topic.to_owned()]).await {
        Ok(c) => Ok(c.get(topic).copied().unwrap_or(0)),
        Err(kafka_io::Error::UnknownTopic(_)) => {
            anyhow::bail!("the topic `{topic}` ({setting}) does not exist")
        }
        Err(e) => Err(e).with_context(|| format!("reading the metadata of `{topic}`")),
    }
}

/// One partition read directly (no group, no commit).
pub struct Reader {
    pub topic: String,
    pub partition: i32,
    fetcher: PartitionFetcher,
    cluster: Arc<Cluster>,
}

impl Reader {
    pub fn new(cluster: &Arc<Cluster>, topic: &str, partition: i32) -> Self {
        Self {
            topic: topic.to_owned(),
            partition,
            fetcher: PartitionFetcher::new(
                cluster.connector.clone(),
                topic.to_owned(),
                partition,
                cluster.request_timeout,
            ),
            cluster: cluster.clone(),
        }
    }

    async fn list_offset(&self, at: OffsetAt) -> Result<i64> {
        let pc = self.cluster.partition(&self.topic, self.partition).await?;
        Ok(bounded(
            "ListOffsets",
            &self.topic,
            self.cluster.request_timeout,
            pc.get_offset(at),
        )
        .await?)
    }

    /// The partition's end offset for a read_committed reader now: the last stable offset
    /// (the high watermark unless a transaction is open) of a Fetch, which is right where some
    /// brokers' ListOffsets(latest) is not (the test broker answers one past the newest batch's
    /// base offset; see the notes on the test broker).
    pub async fn end_offset(&mut self) -> Result<i64> {
        let latest = self.list_offset(OffsetAt::Latest).await?;
        let f = self
            .fetcher
            .fetch(latest.max(0), Duration::from_millis(1), 1)
            .await
            .with_context(|| format!("reading {}/{}", self.topic, self.partition))?;
        Ok(f.stable_end())
    }

    /// The partition's first offset still kept.
    pub async fn start_offset(&self) -> Result<i64> {
        self.list_offset(OffsetAt::Earliest).await
    }

    /// Records from `offset` on (up to 4 MiB of them), waiting at most `max_wait` when there are
    /// none yet, and the offset to read next.
    pub async fn read(
        &mut self,
        offset: i64,
        max_wait: Duration,
    ) -> Result<(Vec<FetchedRecord>, i64)> {
        let f = self
            .fetcher
            .fetch(offset, max_wait, 4 << 20)
            .await
            .with_context(|| format!("reading {}/{}", self.topic, self.partition))?;
        Ok((f.records, f.next_offset))
    }
}
