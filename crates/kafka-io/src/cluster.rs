//! The cluster handle: rskafka's client (partition counts, ListOffsets, CreateTopics) plus our
//! connector (group APIs, fetch, produce, partition leaders, DescribeConfigs), both built once
//! from the same settings. Every rskafka call here is bounded in time.

use std::{
    collections::{BTreeMap, HashMap},
    future::Future,
    sync::Arc,
    time::Duration,
};

use rskafka::{
    BackoffConfig,
    client::{
        Client, ClientBuilder,
        partition::{PartitionClient, UnknownTopicHandling},
    },
};
use tokio::sync::Mutex;

use crate::{
    conn::Connector,
    error::{Error, Result},
    settings::ConnectionSettings,
};

pub struct Cluster {
    pub connector: Connector,
    client: Client,
    partitions: Mutex<HashMap<(String, i32), Arc<PartitionClient>>>,
    pub request_timeout: Duration,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("connector", &self.connector)
            .finish_non_exhaustive()
    }
}

/// Bounds an rskafka call (which has no timeouts of its own).
pub async fn bounded<T>(
    call: &'static str,
    broker: &str,
    after: Duration,
    fut: impl Future<Output = Result<T, rskafka::client::error::Error>>,
) -> Result<T> {
    match tokio::time::timeout(after, fut).await {
        Ok(r) => r.map_err(Error::from),
        Err(_) => Err(Error::Timeout {
            call,
            broker: broker.to_owned(),
            after,
        }),
    }
}

impl Cluster {
    /// Validates the settings (TLS material is read and checked here) and connects.
    pub async fn connect(settings: ConnectionSettings) -> Result<Arc<Self>> {
        let settings = Arc::new(settings);
        let connector = Connector::new(settings.clone())?;
        let mut builder = ClientBuilder::new(settings.bootstrap_strings())
            .client_id(settings.client_id.clone())
            .backoff_config(BackoffConfig {
                init_backoff: Duration::from_millis(50),
                max_backoff: Duration::from_secs(2),
                base: 2.0,
                deadline: Some(Duration::from_secs(10)),
            });
        if let Some(tls) = connector.tls_config() {
            builder = builder.tls_config(tls);
        }
        if let Some(sasl) = &settings.sasl {
            builder = builder.sasl_config(crate::sasl::rskafka_config(sasl));
        }
        let timeout = connector.request_timeout;
        let bootstrap = settings.bootstrap_strings().join(",");
        // An OAUTHBEARER token first: a token endpoint that is down or refuses the client is
        // named as such (not retried), whether or not a broker answers.
        if let Some(source) = settings.sasl.as_ref().and_then(|s| s.oauth.as_ref()) {
            source.token().await?;
            // From now on the token is renewed on a timer (the task ends with the settings).
            source.spawn_refresher();
        }
        // Our own connection first: it gives clear TLS and SASL errors.
        connector.connect_any().await?;
        let client = bounded("connect", &bootstrap, timeout, builder.build()).await?;
        Ok(Arc::new(Self {
            connector,
            client,
            partitions: Mutex::new(HashMap::new()),
            request_timeout: timeout,
        }))
    }

    fn bootstrap(&self) -> String {
        self.connector.settings.bootstrap_strings().join(",")
    }

    /// Partition counts of `topics`, from fresh metadata. Missing topics are an error.
    pub async fn partition_counts(&self, topics: &[String]) -> Result<BTreeMap<String, i32>> {
        let all = bounded(
            "Metadata",
            &self.bootstrap(),
            self.request_timeout,
            self.client.list_topics(),
        )
        .await?;
        let mut out = BTreeMap::new();
        for t in topics {
            let found = all
                .iter()
                .find(|x| &x.name == t)
                .ok_or_else(|| Error::UnknownTopic(t.clone()))?;
            out.insert(t.clone(), found.partitions.len() as i32);
        }
        Ok(out)
    }

    /// A (cached) client for one partition's leader.
    pub async fn partition(&self, topic: &str, partition: i32) -> Result<Arc<PartitionClient>> {
        let key = (topic.to_owned(), partition);
        if let Some(c) = self.partitions.lock().await.get(&key) {
            return Ok(c.clone());
        }
        let c = Arc::new(
            bounded(
                "Metadata",
                &self.bootstrap(),
                self.request_timeout,
                self.client
                    .partition_client(topic, partition, UnknownTopicHandling::Retry),
            )
            .await?,
        );
        self.partitions.lock().await.insert(key, c.clone());
        Ok(c)
    }

    /// Drops the cached client of a partition (after a failed call: the next one reconnects
    /// instead of reusing a connection that may be half-open).
    pub async fn forget_partition(&self, topic: &str, partition: i32) {
        self.partitions
            .lock()
            .await
            .remove(&(topic.to_owned(), partition));
    }

    /// The address of the leader of `topic`/`partition`, from Metadata on our own connection
    /// (any bootstrap broker). A topic the broker does not know is `Error::UnknownTopic`; a
    /// partition without a leader is a retryable broker error.
    pub async fn leader(
        &self,
        connector: &Connector,
        topic: &str,
        partition: i32,
    ) -> Result<crate::settings::BrokerAddr> {
        use kafka_protocol::{
            error::ResponseError,
            messages::{MetadataRequest, TopicName, metadata_request::MetadataRequestTopic},
            protocol::StrBytes,
        };
        let call = async {
            let mut conn = connector.connect_any().await?;
            let v = conn.version::<MetadataRequest>("Metadata", 12)?;
            let mut req = MetadataRequest::default()
                .with_topics(Some(vec![MetadataRequestTopic::default().with_name(Some(
                    TopicName(StrBytes::from_string(topic.to_owned())),
                ))]));
            if v >= 4 {
                req = req.with_allow_auto_topic_creation(false);
            }
            let resp = conn.send(req, v, "Metadata").await?;
            let t = resp
                .topics
                .iter()
                .find(|t| t.name.as_ref().is_some_and(|n| n.0.as_str() == topic))
                .ok_or_else(|| Error::UnknownTopic(topic.to_owned()))?;
            if t.error_code == ResponseError::UnknownTopicOrPartition.code() {
                return Err(Error::UnknownTopic(topic.to_owned()));
            }
            if t.error_code != 0 {
                return Err(crate::conn::broker_error("Metadata", t.error_code, None));
            }
            let p = t
                .partitions
                .iter()
                .find(|p| p.partition_index == partition)
                .ok_or_else(|| Error::UnknownTopic(format!("{topic}/{partition}")))?;
            if p.error_code != 0 && p.leader_id.0 < 0 {
                return Err(crate::conn::broker_error("Metadata", p.error_code, None));
            }
            let b = resp
                .brokers
                .iter()
                .find(|b| b.node_id == p.leader_id)
                .ok_or_else(|| {
                    crate::conn::broker_error(
                        "Metadata",
                        ResponseError::LeaderNotAvailable.code(),
                        None,
                    )
                })?;
            Ok(crate::settings::BrokerAddr {
                host: b.host.to_string(),
                port: u16::try_from(b.port).map_err(|_| Error::Protocol {
                    call: "Metadata",
                    why: format!("broker port {}", b.port),
                })?,
            })
        };
        match tokio::time::timeout(self.request_timeout, call).await {
            Ok(r) => r,
            Err(_) => Err(Error::Timeout {
                call: "Metadata (partition leader)",
                broker: self.bootstrap(),
                after: self.request_timeout,
            }),
        }
    }

    /// The topic's `max.message.bytes` (DescribeConfigs); None when the broker does not say.
    pub async fn topic_max_message_bytes(&self, topic: &str) -> Result<Option<usize>> {
        use kafka_protocol::messages::{
            DescribeConfigsRequest, describe_configs_request::DescribeConfigsResource,
        };
        use kafka_protocol::protocol::StrBytes;
        let mut conn = self.connector.connect_any().await?;
        let Ok(v) = conn.version::<DescribeConfigsRequest>("DescribeConfigs", 1) else {
            return Ok(None);
        };
        let req = DescribeConfigsRequest::default().with_resources(vec![
            DescribeConfigsResource::default()
                .with_resource_type(2) // topic
                .with_resource_name(StrBytes::from_string(topic.to_owned()))
                .with_configuration_keys(None),
        ]);
        let resp = conn.send(req, v, "DescribeConfigs").await?;
        Ok(resp
            .results
            .iter()
            .filter(|r| r.error_code == 0)
            .flat_map(|r| r.configs.iter())
            .filter(|c| c.name.as_str() == "max.message.bytes")
            .find_map(|c| c.value.as_ref()?.as_str().trim().parse::<usize>().ok())
            .filter(|n| *n > 0))
    }

    /// Creates a topic; an existing topic is fine.
    pub async fn create_topic(&self, name: &str, partitions: i32) -> Result<()> {
        let ctl = self.client.controller_client()?;
        match bounded(
            "CreateTopics",
            &self.bootstrap(),
            self.request_timeout,
            ctl.create_topic(name, partitions, 1, 10_000),
        )
        .await
        {
            Ok(()) => Ok(()),
            Err(Error::Client(rskafka::client::error::Error::ServerError {
                protocol_error: rskafka::client::error::ProtocolError::TopicAlreadyExists,
                ..
            })) => Ok(()),
            Err(e) => Err(e),
        }
    }
}
