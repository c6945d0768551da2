//! What the tools (`kafka-infer lag`, `check`) ask a cluster besides the record path: the
//! brokers it advertises, a group's description (DescribeGroups), a partition's log start
//! (ListOffsets earliest), and a partition's high watermark and first record at an offset
//! (one small Fetch: ListOffsets latest is wrong on some brokers). Every call is bounded.

use std::time::Duration;

use kafka_protocol::messages::{DescribeGroupsRequest, GroupId, MetadataRequest};
use rskafka::client::partition::OffsetAt;

use crate::{
    assignor::{Tp, decode_assignment},
    cluster::{Cluster, bounded},
    conn::s,
    conn::{BrokerConn, Connector, broker_error},
    error::{Error, Result},
    fetch::{Fetched, PartitionFetcher},
    settings::BrokerAddr,
};

/// One member of a group, as DescribeGroups tells it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupMember {
    pub member_id: String,
    pub instance_id: Option<String>,
    pub client_id: String,
    pub client_host: String,
    /// Its partitions (decoded from the consumer protocol's assignment; empty if undecodable).
    pub assignment: Vec<Tp>,
}

/// A group as DescribeGroups tells it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupDescription {
    /// Stable, PreparingRebalance, CompletingRebalance, Empty, Dead (or what the broker says).
    pub state: String,
    pub protocol_type: String,
    /// The assignor chosen (e.g. cooperative-sticky).
    pub protocol: String,
    pub members: Vec<GroupMember>,
}

/// Bounds `fut` by `after`, naming `call` on a timeout.
async fn within<T>(
    call: &'static str,
    broker: String,
    after: Duration,
    fut: impl Future<Output = Result<T>>,
) -> Result<T> {
    tokio::time::timeout(after, fut)
        .await
        .unwrap_or(Err(Error::Timeout {
            call,
            broker,
            after,
        }))
}

fn bootstrap(connector: &Connector) -> String {
    connector.settings.bootstrap_strings().join(",")
}

/// A connection to the group's coordinator (FindCoordinator through any bootstrap broker).
pub async fn coordinator(connector: &Connector, group: &str) -> Result<BrokerConn> {
    let call = connector.find_coordinator(0, group);
    within(
        "FindCoordinator",
        bootstrap(connector),
        connector.request_timeout,
        call,
    )
    .await
}

/// The group's state and members (DescribeGroups on its coordinator).
pub async fn describe_group(connector: &Connector, group: &str) -> Result<GroupDescription> {
    let call = async {
        let mut c = coordinator(connector, group).await?;
        let v = c.version::<DescribeGroupsRequest>("DescribeGroups", 5)?;
        let resp = c
            .send(
                DescribeGroupsRequest::default().with_groups(vec![GroupId(s(group))]),
                v,
                "DescribeGroups",
            )
            .await?;
        let g = resp
            .groups
            .into_iter()
            .find(|g| g.group_id.0.as_str() == group)
            .ok_or_else(|| Error::Protocol {
                call: "DescribeGroups",
                why: format!("the answer does not name group {group}"),
            })?;
        if g.error_code != 0 {
            return Err(broker_error("DescribeGroups", g.error_code, None));
        }
        Ok(GroupDescription {
            state: g.group_state.to_string(),
            protocol_type: g.protocol_type.to_string(),
            protocol: g.protocol_data.to_string(),
            members: g
                .members
                .into_iter()
                .map(|m| GroupMember {
                    member_id: m.member_id.to_string(),
                    instance_id: m.group_instance_id.map(|i| i.to_string()),
                    client_id: m.client_id.to_string(),
                    client_host: m.client_host.to_string(),
                    assignment: decode_assignment(m.member_assignment)
                        .map(|a| a.into_iter().collect())
                        .unwrap_or_default(),
                })
                .collect(),
        })
    };
    within(
        "DescribeGroups",
        bootstrap(connector),
        connector.request_timeout,
        call,
    )
    .await
}

/// The brokers the cluster advertises (Metadata through any bootstrap broker).
pub async fn brokers(connector: &Connector) -> Result<Vec<BrokerAddr>> {
    let call = async {
        let mut c = connector.connect_any().await?;
        let v = c.version::<MetadataRequest>("Metadata", 12)?;
        let resp = c
            .send(
                MetadataRequest::default().with_topics(Some(vec![])),
                v,
                "Metadata",
            )
            .await?;
        resp.brokers
            .iter()
            .map(|b| {
                Ok(BrokerAddr {
                    host: b.host.to_string(),
                    port: u16::try_from(b.port).map_err(|_| Error::Protocol {
                        call: "Metadata",
                        why: format!("broker {} has port {}", b.node_id.0, b.port),
                    })?,
                })
            })
            .collect()
    };
    within(
        "Metadata",
        bootstrap(connector),
        connector.request_timeout,
        call,
    )
    .await
}

/// The partition's log start offset (ListOffsets earliest).
pub async fn earliest_offset(cluster: &Cluster, topic: &str, partition: i32) -> Result<i64> {
    let pc = cluster.partition(topic, partition).await?;
    bounded(
        "ListOffsets",
        topic,
        cluster.request_timeout,
        pc.get_offset(OffsetAt::Earliest),
    )
    .await
}

/// One read_committed Fetch of `topic`/`partition` at `offset` that does not wait for data:
/// the high watermark, the last stable offset and the first batch's records from `offset`
/// (their timestamps say how old the oldest unread record is). Bounded by the connector's
/// request timeout.
pub async fn peek(
    connector: &Connector,
    topic: &str,
    partition: i32,
    offset: i64,
) -> Result<Fetched> {
    let mut f = PartitionFetcher::new(
        connector.clone(),
        topic.to_owned(),
        partition,
        connector.request_timeout,
    );
    // 1 byte: the first batch comes whole anyway, nothing more.
    f.fetch(offset, Duration::from_millis(1), 1).await
}
