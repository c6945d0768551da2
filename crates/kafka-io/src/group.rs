//! One member of a consumer group, classic protocol: FindCoordinator, JoinGroup (with the
//! MEMBER_ID_REQUIRED round), SyncGroup (the leader assigns), Heartbeat, OffsetCommit,
//! OffsetFetch, LeaveGroup. Calls are made by one task, in order; this type keeps the protocol
//! state (coordinator connection, member id, generation) and nothing else.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    time::Duration,
};

use kafka_protocol::{
    error::ResponseError,
    messages::{
        GroupId, HeartbeatRequest, JoinGroupRequest, LeaveGroupRequest, OffsetCommitRequest,
        OffsetFetchRequest, SyncGroupRequest, TopicName,
        join_group_request::JoinGroupRequestProtocol,
        leave_group_request::MemberIdentity,
        offset_commit_request::{OffsetCommitRequestPartition, OffsetCommitRequestTopic},
        offset_fetch_request::{
            OffsetFetchRequestGroup, OffsetFetchRequestTopic, OffsetFetchRequestTopics,
        },
        sync_group_request::SyncGroupRequestAssignment,
    },
    protocol::StrBytes,
};

use crate::{
    assignor::{self, Assignor, Tp},
    conn::s,
    conn::{BrokerConn, Connector, broker_error},
    error::{Error, Result},
};

/// Settings of group membership.
#[derive(Clone, Debug)]
pub struct GroupConfig {
    pub group_id: String,
    pub topics: Vec<String>,
    /// The coordinator drops a member it has not heard from for this long.
    pub session_timeout: Duration,
    pub heartbeat_interval: Duration,
    /// How long a rebalance waits for members to rejoin (the drain budget on revoke).
    pub rebalance_timeout: Duration,
    /// Static membership (`group.instance.id`): a restart within the session timeout keeps the
    /// assignment without a rebalance.
    pub instance_id: Option<String>,
    /// In preference order; the coordinator picks one all members support.
    pub assignors: Vec<Assignor>,
    /// OffsetFetch asks for stable offsets (v7+, KIP-447): while a transaction holding offsets
    /// of a partition is not yet complete, the coordinator answers UNSTABLE_OFFSET_COMMIT and
    /// the fetch is asked again, so a new owner never starts from the offset before it.
    pub require_stable: bool,
}

impl GroupConfig {
    pub fn new(group_id: impl Into<String>, topics: Vec<String>) -> Self {
        Self {
            group_id: group_id.into(),
            topics,
            session_timeout: Duration::from_secs(10),
            heartbeat_interval: Duration::from_secs(3),
            rebalance_timeout: Duration::from_secs(30),
            instance_id: None,
            // The coordinator picks the first that every member supports: cooperative-sticky
            // with members that have it (librdkafka, Java), else range.
            assignors: vec![
                Assignor::CooperativeSticky,
                Assignor::Range,
                Assignor::RoundRobin,
            ],
            require_stable: false,
        }
    }
}

/// The outcome of a join: this generation's partitions.
#[derive(Clone, Debug)]
pub struct Assignment {
    pub generation: i32,
    pub partitions: BTreeSet<Tp>,
    pub leader: bool,
}

pub struct Member {
    connector: Connector,
    pub config: GroupConfig,
    coordinator: Option<BrokerConn>,
    member_id: String,
    generation: i32,
    /// The generation of our current assignment (sent as the owned partitions' generation).
    assigned_generation: i32,
    protocol: Option<String>,
}

impl Member {
    pub fn new(connector: Connector, config: GroupConfig) -> Self {
        Self {
            connector,
            config,
            coordinator: None,
            member_id: String::new(),
            generation: -1,
            assigned_generation: -1,
            protocol: None,
        }
    }

    pub fn member_id(&self) -> &str {
        &self.member_id
    }

    /// The assignment protocol the coordinator chose at the last join.
    pub fn protocol(&self) -> Option<&str> {
        self.protocol.as_deref()
    }

    /// True when the group runs the cooperative protocol (KIP-429): partitions that do not
    /// move keep running through a rebalance.
    pub fn is_cooperative(&self) -> bool {
        self.protocol
            .as_deref()
            .and_then(Assignor::from_name)
            .is_some_and(Assignor::is_cooperative)
    }

    /// Forgets the coordinator connection (after a timeout): the next call finds it again on
    /// a new connection.
    pub fn drop_coordinator(&mut self) {
        self.coordinator = None;
    }

    /// The generation of the last join (-1: not joined).
    pub fn generation(&self) -> i32 {
        self.generation
    }

    /// Takes another member handle's identity (a second connection for the same member, e.g.
    /// for heartbeats and commits while this one waits in JoinGroup).
    pub fn adopt(&mut self, member_id: &str, generation: i32) {
        self.member_id = member_id.to_owned();
        self.generation = generation;
    }

    /// Forgets the member id (after UNKNOWN_MEMBER_ID): the next join starts fresh.
    pub fn reset_member(&mut self) {
        self.member_id.clear();
        self.generation = -1;
        self.assigned_generation = -1;
    }

    async fn coordinator(&mut self) -> Result<&mut BrokerConn> {
        if self.coordinator.is_none() {
            let conn = self
                .connector
                .find_coordinator(0, &self.config.group_id)
                .await?;
            self.coordinator = Some(conn);
        }
        Ok(self.coordinator.as_mut().expect("set above"))
    }

    /// Runs `f` on the coordinator; a lost connection or a moved coordinator drops the
    /// connection so the next call rediscovers it.
    async fn on_coordinator<T>(
        &mut self,
        f: impl AsyncFnOnce(&mut BrokerConn) -> Result<T>,
    ) -> Result<T> {
        let conn = self.coordinator().await?;
        let r = f(conn).await;
        if let Err(e) = &r
            && (matches!(
                e,
                Error::Io { .. } | Error::Timeout { .. } | Error::Protocol { .. }
            ) || matches!(
                e.broker_error(),
                Some(ResponseError::NotCoordinator | ResponseError::CoordinatorNotAvailable)
            ))
        {
            self.coordinator = None;
        }
        r
    }

    /// Joins the group (JoinGroup, then SyncGroup), telling the group what this member owns
    /// (`owned`, for the cooperative protocol). `partition_counts` is asked for the partition
    /// counts of the subscribed topics when this member leads.
    pub async fn join(
        &mut self,
        owned: &BTreeSet<Tp>,
        partition_counts: impl AsyncFnOnce(&[String]) -> Result<BTreeMap<String, i32>>,
    ) -> Result<Assignment> {
        let sub = assignor::Subscription::new(self.config.topics.clone())
            .with_owned(owned)
            .with_generation(self.assigned_generation);
        let protocols: Vec<JoinGroupRequestProtocol> = self
            .config
            .assignors
            .iter()
            .map(|a| {
                JoinGroupRequestProtocol::default()
                    .with_name(StrBytes::from_static_str(a.name()))
                    .with_metadata(sub.encode(*a))
            })
            .collect();
        let cfg = self.config.clone();
        let join_timeout = cfg.rebalance_timeout + Duration::from_secs(5);
        let mut resp = None;
        for _ in 0..3 {
            let member_id = self.member_id.clone();
            let protocols = protocols.clone();
            let cfg = cfg.clone();
            let r = self
                .on_coordinator(async move |c: &mut BrokerConn| {
                    let v = c.version::<JoinGroupRequest>("JoinGroup", 7)?;
                    if cfg.instance_id.is_some() && v < 5 {
                        return Err(Error::Version {
                            call: "JoinGroup (static membership)",
                            ours: "5..7".into(),
                            theirs: format!("..{v}"),
                        });
                    }
                    let mut req = JoinGroupRequest::default()
                        .with_group_id(GroupId(s(&cfg.group_id)))
                        .with_session_timeout_ms(cfg.session_timeout.as_millis() as i32)
                        .with_member_id(s(&member_id))
                        .with_protocol_type(StrBytes::from_static_str("consumer"))
                        .with_protocols(protocols);
                    if v >= 1 {
                        req =
                            req.with_rebalance_timeout_ms(cfg.rebalance_timeout.as_millis() as i32);
                    }
                    if v >= 5 {
                        req = req.with_group_instance_id(cfg.instance_id.as_deref().map(s));
                    }
                    c.send_with_timeout(req, v, "JoinGroup", join_timeout).await
                })
                .await?;
            match ResponseError::try_from_code(r.error_code) {
                None => {
                    resp = Some(r);
                    break;
                }
                Some(ResponseError::MemberIdRequired) => {
                    self.member_id = r.member_id.to_string();
                    continue;
                }
                Some(_) => {
                    // Clears the member (UNKNOWN_MEMBER_ID) or the coordinator (NOT_COORDINATOR,
                    // COORDINATOR_NOT_AVAILABLE) as the code says.
                    self.check("JoinGroup", r.error_code)?;
                }
            }
        }
        let resp = resp.ok_or_else(|| Error::Protocol {
            call: "JoinGroup",
            why: "no member id after MEMBER_ID_REQUIRED".into(),
        })?;
        self.member_id = resp.member_id.to_string();
        self.generation = resp.generation_id;
        self.protocol = resp.protocol_name.as_ref().map(|p| p.to_string());
        let leader = resp.leader == resp.member_id;

        let assignments = if leader {
            let name = self.protocol.clone().unwrap_or_else(|| "range".into());
            let assignor = Assignor::from_name(&name).ok_or_else(|| Error::Protocol {
                call: "JoinGroup",
                why: format!("coordinator chose assignor {name}, which we do not offer"),
            })?;
            let mut members = BTreeMap::new();
            let mut unreadable = Vec::new();
            for m in &resp.members {
                match assignor::Subscription::decode(&m.metadata) {
                    Ok(sub) => {
                        members.insert(m.member_id.to_string(), sub);
                    }
                    // One bad member must not stop the group: it gets nothing (as librdkafka).
                    Err(why) => {
                        tracing::warn!(group = %cfg.group_id, member = %m.member_id, %why,
                            "unreadable subscription: the member gets no partitions");
                        unreadable.push(m.member_id.to_string());
                    }
                }
            }
            // Only topics we know to ask for: a member cannot make us create topics.
            let all: BTreeSet<String> = members
                .values()
                .flat_map(|s| s.topics.iter().cloned())
                .filter(|t| cfg.topics.contains(t))
                .collect();
            let counts = partition_counts(&all.into_iter().collect::<Vec<_>>()).await?;
            let plan = assignor.assign_subscriptions(&members, &counts);
            tracing::info!(group = %cfg.group_id, generation = self.generation, assignor = name,
                members = members.len(), "leading the group: assigned partitions");
            plan.into_iter()
                .chain(unreadable.into_iter().map(|m| (m, Vec::new())))
                .map(|(m, tps)| {
                    SyncGroupRequestAssignment::default()
                        .with_member_id(s(&m))
                        .with_assignment(assignor::encode_assignment(&tps))
                })
                .collect()
        } else {
            Vec::new()
        };

        let (member_id, generation, protocol) = (
            self.member_id.clone(),
            self.generation,
            self.protocol.clone(),
        );
        let sync = self
            .on_coordinator(async move |c: &mut BrokerConn| {
                let v = c.version::<SyncGroupRequest>("SyncGroup", 5)?;
                let mut req = SyncGroupRequest::default()
                    .with_group_id(GroupId(s(&cfg.group_id)))
                    .with_generation_id(generation)
                    .with_member_id(s(&member_id))
                    .with_assignments(assignments);
                if v >= 3 {
                    req = req.with_group_instance_id(cfg.instance_id.as_deref().map(s));
                }
                if v >= 5 {
                    req = req
                        .with_protocol_type(Some(StrBytes::from_static_str("consumer")))
                        .with_protocol_name(protocol.as_deref().map(s));
                }
                c.send_with_timeout(req, v, "SyncGroup", join_timeout).await
            })
            .await?;
        self.check("SyncGroup", sync.error_code)?;
        let partitions =
            assignor::decode_assignment(sync.assignment).map_err(|why| Error::Protocol {
                call: "SyncGroup",
                why: format!("bad assignment from the leader: {why}"),
            })?;
        self.assigned_generation = self.generation;
        Ok(Assignment {
            generation: self.generation,
            partitions,
            leader,
        })
    }

    /// One heartbeat. REBALANCE_IN_PROGRESS, ILLEGAL_GENERATION, UNKNOWN_MEMBER_ID and
    /// FENCED_INSTANCE_ID come back as `Error::Broker`: the caller revokes and rejoins.
    pub async fn heartbeat(&mut self, timeout: Duration) -> Result<()> {
        let (group, member, generation, instance) = (
            self.config.group_id.clone(),
            self.member_id.clone(),
            self.generation,
            self.config.instance_id.clone(),
        );
        let resp = self
            .on_coordinator(async move |c: &mut BrokerConn| {
                let v = c.version::<HeartbeatRequest>("Heartbeat", 4)?;
                let mut req = HeartbeatRequest::default()
                    .with_group_id(GroupId(s(&group)))
                    .with_generation_id(generation)
                    .with_member_id(s(&member));
                if v >= 3 {
                    req = req.with_group_instance_id(instance.as_deref().map(s));
                }
                c.send_with_timeout(req, v, "Heartbeat", timeout).await
            })
            .await?;
        self.check("Heartbeat", resp.error_code)
    }

    fn check(&mut self, call: &'static str, code: i16) -> Result<()> {
        match ResponseError::try_from_code(code) {
            None => Ok(()),
            Some(e) => {
                if matches!(e, ResponseError::UnknownMemberId) {
                    self.reset_member();
                }
                if matches!(
                    e,
                    ResponseError::NotCoordinator | ResponseError::CoordinatorNotAvailable
                ) {
                    self.coordinator = None;
                }
                Err(broker_error(call, code, None))
            }
        }
    }

    /// Commits positions (the next offset to read) for this generation. A generation that is no
    /// longer current is fenced by the coordinator (ILLEGAL_GENERATION).
    pub async fn commit(&mut self, positions: &[(Tp, i64)]) -> Result<()> {
        if positions.is_empty() {
            return Ok(());
        }
        let mut by_topic: BTreeMap<&str, Vec<OffsetCommitRequestPartition>> = BTreeMap::new();
        for ((t, p), o) in positions {
            by_topic.entry(t).or_default().push(
                OffsetCommitRequestPartition::default()
                    .with_partition_index(*p)
                    .with_committed_offset(*o),
            );
        }
        let topics: Vec<OffsetCommitRequestTopic> = by_topic
            .into_iter()
            .map(|(t, ps)| {
                OffsetCommitRequestTopic::default()
                    .with_name(TopicName(s(t)))
                    .with_partitions(ps)
            })
            .collect();
        let (group, member, generation, instance) = (
            self.config.group_id.clone(),
            self.member_id.clone(),
            self.generation,
            self.config.instance_id.clone(),
        );
        let resp = self
            .on_coordinator(async move |c: &mut BrokerConn| {
                let v = c.version::<OffsetCommitRequest>("OffsetCommit", 7)?;
                let mut req = OffsetCommitRequest::default()
                    .with_group_id(GroupId(s(&group)))
                    .with_generation_id_or_member_epoch(generation)
                    .with_member_id(s(&member))
                    .with_topics(topics);
                if v >= 7 {
                    req = req.with_group_instance_id(instance.as_deref().map(s));
                }
                c.send(req, v, "OffsetCommit").await
            })
            .await?;
        for t in &resp.topics {
            for p in &t.partitions {
                self.check("OffsetCommit", p.error_code)?;
            }
        }
        Ok(())
    }

    /// The group's committed positions for `tps` (None: never committed). With
    /// [`GroupConfig::require_stable`], UNSTABLE_OFFSET_COMMIT (a transaction with offsets of
    /// these partitions is completing) is asked again, every 100 ms up to 100 times.
    pub async fn committed(&mut self, tps: &BTreeSet<Tp>) -> Result<HashMap<Tp, Option<i64>>> {
        let mut tries = 0;
        loop {
            match self.committed_once(tps).await {
                Err(e)
                    if e.broker_error() == Some(ResponseError::UnstableOffsetCommit)
                        && tries < 100 =>
                {
                    tries += 1;
                    tracing::debug!(group = %self.config.group_id, "offsets not stable yet (a transaction is completing); asking again");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                r => return r,
            }
        }
    }

    async fn committed_once(&mut self, tps: &BTreeSet<Tp>) -> Result<HashMap<Tp, Option<i64>>> {
        let mut by_topic: BTreeMap<String, Vec<i32>> = BTreeMap::new();
        for (t, p) in tps {
            by_topic.entry(t.clone()).or_default().push(*p);
        }
        let group = self.config.group_id.clone();
        let stable = self.config.require_stable;
        let resp = self
            .on_coordinator(async move |c: &mut BrokerConn| {
                let v = c.version::<OffsetFetchRequest>("OffsetFetch", 8)?;
                if stable && v < 7 {
                    return Err(Error::Version {
                        call: "OffsetFetch (require_stable, for transactions)",
                        ours: "7..8".into(),
                        theirs: format!("..{v}"),
                    });
                }
                let req = if v >= 8 {
                    OffsetFetchRequest::default().with_groups(vec![
                        OffsetFetchRequestGroup::default()
                            .with_group_id(GroupId(s(&group)))
                            .with_topics(Some(
                                by_topic
                                    .into_iter()
                                    .map(|(t, ps)| {
                                        OffsetFetchRequestTopics::default()
                                            .with_name(TopicName(s(&t)))
                                            .with_partition_indexes(ps)
                                    })
                                    .collect(),
                            )),
                    ])
                } else {
                    OffsetFetchRequest::default()
                        .with_group_id(GroupId(s(&group)))
                        .with_topics(Some(
                            by_topic
                                .into_iter()
                                .map(|(t, ps)| {
                                    OffsetFetchRequestTopic::default()
                                        .with_name(TopicName(s(&t)))
                                        .with_partition_indexes(ps)
                                })
                                .collect(),
                        ))
                };
                let req = if v >= 7 {
                    req.with_require_stable(stable)
                } else {
                    req
                };
                c.send(req, v, "OffsetFetch").await
            })
            .await?;
        let mut out = HashMap::new();
        let mut put = |t: &TopicName, p: i32, o: i64, code: i16| -> Result<()> {
            if code != 0 {
                return Err(broker_error("OffsetFetch", code, None));
            }
            out.insert((t.0.to_string(), p), (o >= 0).then_some(o));
            Ok(())
        };
        if let Some(g) = resp.groups.first() {
            self.check("OffsetFetch", g.error_code)?;
            for t in &g.topics {
                for p in &t.partitions {
                    put(&t.name, p.partition_index, p.committed_offset, p.error_code)?;
                }
            }
        } else {
            self.check("OffsetFetch", resp.error_code)?;
            for t in &resp.topics {
                for p in &t.partitions {
                    put(&t.name, p.partition_index, p.committed_offset, p.error_code)?;
                }
            }
        }
        Ok(out)
    }

    /// Leaves the group so its partitions move at once rather than after the session timeout.
    /// Static members do not leave (their assignment waits for their return).
    pub async fn leave(&mut self) -> Result<()> {
        if self.member_id.is_empty() || self.config.instance_id.is_some() {
            return Ok(());
        }
        let (group, member) = (self.config.group_id.clone(), self.member_id.clone());
        let resp = self
            .on_coordinator(async move |c: &mut BrokerConn| {
                let v = c.version::<LeaveGroupRequest>("LeaveGroup", 4)?;
                let mut req = LeaveGroupRequest::default().with_group_id(GroupId(s(&group)));
                req = if v >= 3 {
                    req.with_members(vec![MemberIdentity::default().with_member_id(s(&member))])
                } else {
                    req.with_member_id(s(&member))
                };
                c.send(req, v, "LeaveGroup").await
            })
            .await?;
        self.reset_member();
        match ResponseError::try_from_code(resp.error_code) {
            None | Some(ResponseError::UnknownMemberId) => Ok(()),
            Some(_) => Err(broker_error("LeaveGroup", resp.error_code, None)),
        }
    }
}
