//! Partition assignors of the classic consumer protocol ("range", "roundrobin"), and the
//! ConsumerProtocol subscription/assignment bytes every standard client puts inside
//! JoinGroup/SyncGroup, so Java and librdkafka members can share a group with ours.

use std::collections::{BTreeMap, BTreeSet};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use kafka_protocol::{
    messages::{
        ConsumerProtocolAssignment, ConsumerProtocolSubscription, TopicName,
        consumer_protocol_assignment::TopicPartition as AssignedTopic,
    },
    protocol::{Decodable, Encodable, StrBytes},
};

/// A partition of a topic.
pub type Tp = (String, i32);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Assignor {
    Range,
    RoundRobin,
}

impl Assignor {
    pub fn name(self) -> &'static str {
        match self {
            Assignor::Range => "range",
            Assignor::RoundRobin => "roundrobin",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "range" => Some(Self::Range),
            "roundrobin" => Some(Self::RoundRobin),
            _ => None,
        }
    }

    /// Assigns every partition of `partitions` (topic -> count) to exactly one member that
    /// subscribes to its topic. `members`: member id -> subscribed topics.
    pub fn assign(
        self,
        members: &BTreeMap<String, Vec<String>>,
        partitions: &BTreeMap<String, i32>,
    ) -> BTreeMap<String, Vec<Tp>> {
        let mut out: BTreeMap<String, Vec<Tp>> =
            members.keys().map(|m| (m.clone(), Vec::new())).collect();
        match self {
            Assignor::Range => {
                for (topic, &count) in partitions {
                    let subs: Vec<&String> = members
                        .iter()
                        .filter(|(_, t)| t.contains(topic))
                        .map(|(m, _)| m)
                        .collect();
                    if subs.is_empty() {
                        continue;
                    }
                    let per = count as usize / subs.len();
                    let extra = count as usize % subs.len();
                    let mut next = 0i32;
                    for (i, m) in subs.iter().enumerate() {
                        let n = per + usize::from(i < extra);
                        let list = out.get_mut(*m).expect("member listed");
                        for p in next..next + n as i32 {
                            list.push((topic.clone(), p));
                        }
                        next += n as i32;
                    }
                }
            }
            Assignor::RoundRobin => {
                let ids: Vec<&String> = members.keys().collect();
                let mut turn = 0usize;
                for (topic, &count) in partitions {
                    for p in 0..count {
                        for _ in 0..ids.len() {
                            let m = ids[turn % ids.len()];
                            turn += 1;
                            if members[m].contains(topic) {
                                out.get_mut(m)
                                    .expect("member listed")
                                    .push((topic.clone(), p));
                                break;
                            }
                        }
                    }
                }
            }
        }
        out
    }
}

/// Subscription bytes (ConsumerProtocol version 0: topics and no user data).
pub fn encode_subscription(topics: &[String]) -> Bytes {
    let sub = ConsumerProtocolSubscription::default().with_topics(
        topics
            .iter()
            .map(|t| StrBytes::from_string(t.clone()))
            .collect(),
    );
    let mut buf = BytesMut::new();
    buf.put_i16(0);
    sub.encode(&mut buf, 0).expect("v0 subscription encodes");
    buf.freeze()
}

/// Reads any member's subscription (versions 0-3; newer versions keep the same prefix).
pub fn decode_subscription(mut bytes: Bytes) -> Result<Vec<String>, String> {
    if bytes.len() < 2 {
        return Err("subscription shorter than its version".into());
    }
    let v = bytes.get_i16().clamp(0, 3);
    let sub = ConsumerProtocolSubscription::decode(&mut bytes, v).map_err(|e| e.to_string())?;
    Ok(sub.topics.iter().map(|t| t.to_string()).collect())
}

/// Assignment bytes (version 0).
pub fn encode_assignment(tps: &[Tp]) -> Bytes {
    let mut by_topic: BTreeMap<&str, Vec<i32>> = BTreeMap::new();
    for (t, p) in tps {
        by_topic.entry(t).or_default().push(*p);
    }
    let a = ConsumerProtocolAssignment::default().with_assigned_partitions(
        by_topic
            .into_iter()
            .map(|(t, ps)| {
                AssignedTopic::default()
                    .with_topic(TopicName(StrBytes::from_string(t.to_owned())))
                    .with_partitions(ps)
            })
            .collect(),
    );
    let mut buf = BytesMut::new();
    buf.put_i16(0);
    a.encode(&mut buf, 0).expect("v0 assignment encodes");
    buf.freeze()
}

/// Reads the assignment the leader (ours or another client's) sent. Empty bytes: nothing.
pub fn decode_assignment(mut bytes: Bytes) -> Result<BTreeSet<Tp>, String> {
    if bytes.len() < 2 {
        return Ok(BTreeSet::new());
    }
    let v = bytes.get_i16().clamp(0, 3);
    let a = ConsumerProtocolAssignment::decode(&mut bytes, v).map_err(|e| e.to_string())?;
    Ok(a.assigned_partitions
        .iter()
        .flat_map(|t| t.partitions.iter().map(|p| (t.topic.0.to_string(), *p)))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(spec: &[(&str, &[&str])]) -> BTreeMap<String, Vec<String>> {
        spec.iter()
            .map(|(m, ts)| (m.to_string(), ts.iter().map(|t| t.to_string()).collect()))
            .collect()
    }

    fn check_complete(out: &BTreeMap<String, Vec<Tp>>, parts: &BTreeMap<String, i32>) {
        let mut seen = BTreeSet::new();
        for tps in out.values() {
            for tp in tps {
                assert!(seen.insert(tp.clone()), "{tp:?} assigned twice");
            }
        }
        let total: i32 = parts.values().sum();
        assert_eq!(seen.len(), total as usize);
    }

    #[test]
    fn range_splits_like_java() {
        let m = members(&[("a", &["t"]), ("b", &["t"]), ("c", &["t"])]);
        let parts = BTreeMap::from([("t".to_string(), 7)]);
        let out = Assignor::Range.assign(&m, &parts);
        check_complete(&out, &parts);
        let ps = |m: &str| out[m].iter().map(|(_, p)| *p).collect::<Vec<_>>();
        assert_eq!(ps("a"), [0, 1, 2]);
        assert_eq!(ps("b"), [3, 4]);
        assert_eq!(ps("c"), [5, 6]);
    }

    #[test]
    fn roundrobin_skips_members_not_subscribed() {
        let m = members(&[("a", &["t", "u"]), ("b", &["t"]), ("c", &["u"])]);
        let parts = BTreeMap::from([("t".to_string(), 4), ("u".to_string(), 3)]);
        for a in [Assignor::Range, Assignor::RoundRobin] {
            let out = a.assign(&m, &parts);
            check_complete(&out, &parts);
            assert!(out["b"].iter().all(|(t, _)| t == "t"));
            assert!(out["c"].iter().all(|(t, _)| t == "u"));
        }
        let out = Assignor::RoundRobin.assign(&m, &parts);
        let sizes: Vec<usize> = out.values().map(Vec::len).collect();
        assert!(
            sizes.iter().max().unwrap() - sizes.iter().min().unwrap() <= 1,
            "{out:?}"
        );
    }

    #[test]
    fn more_members_than_partitions_leaves_some_idle() {
        let m = members(&[("a", &["t"]), ("b", &["t"]), ("c", &["t"])]);
        let parts = BTreeMap::from([("t".to_string(), 2)]);
        let out = Assignor::Range.assign(&m, &parts);
        check_complete(&out, &parts);
        assert!(out["c"].is_empty());
    }

    #[test]
    fn protocol_bytes_round_trip() {
        let sub = encode_subscription(&["in".into(), "other".into()]);
        assert_eq!(decode_subscription(sub).unwrap(), ["in", "other"]);
        let tps = vec![
            ("in".to_string(), 3),
            ("in".to_string(), 0),
            ("x".to_string(), 1),
        ];
        let got = decode_assignment(encode_assignment(&tps)).unwrap();
        assert_eq!(got, tps.into_iter().collect());
        assert!(decode_assignment(Bytes::new()).unwrap().is_empty());
        assert!(decode_subscription(Bytes::from_static(&[0, 0, 0xff])).is_err());
    }
}
