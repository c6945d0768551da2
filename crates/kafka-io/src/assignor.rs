//! Partition assignors of the classic consumer protocol ("range", "roundrobin",
//! "cooperative-sticky"), and the ConsumerProtocol subscription/assignment bytes every standard
//! client puts inside JoinGroup/SyncGroup, so Java and librdkafka members can share a group with
//! ours.
//!
//! The bytes come from other group members (subscriptions, read by the leader) or from the leader
//! (assignments), so they are decoded by hand: every array count and string length is checked
//! against the bytes left and against fixed caps before anything is allocated.
//!
//! Interop (checked against Apache Kafka's `ConsumerProtocol` and librdkafka 2.x):
//! - Subscriptions: Java >= 3.4 and librdkafka >= 2.2 write version 3 (topics, user data, owned
//!   partitions, generation id, rack id); Java 2.4-3.3 and librdkafka 1.6-2.1 write version 1;
//!   older ones version 0.
//!   Both read any version >= 0, parse a newer one with the newest layout they know and ignore
//!   bytes after it. We write version 3 ([`Subscription::encode`]) and read every version the same
//!   way; versions 0-3 must end exactly where their layout ends.
//! - Java's cooperative-sticky also puts its generation, 4 bytes, in the user data (the only place
//!   before version 2); we write it too and read it when the generation field is absent.
//! - Assignments: all versions share one layout; Java writes version 3, librdkafka version 0. We
//!   write version 0. Empty assignment bytes mean no partitions.

use std::collections::{BTreeMap, BTreeSet};

use bytes::{BufMut, Bytes, BytesMut};

pub mod sticky;

/// A partition of a topic.
pub type Tp = (String, i32);

/// Longest topic name Kafka accepts (`Topic.MAX_NAME_LENGTH`).
pub const MAX_TOPIC_NAME: usize = 249;
/// Most topics one subscription, or one owned/assigned partition list, may name (librdkafka
/// rejects subscriptions of more than 10 000 topics).
pub const MAX_TOPICS: usize = 10_000;
/// Most partitions one owned/assigned partition list may hold, over all its topics (librdkafka's
/// per-topic cap).
pub const MAX_PARTITIONS: usize = 100_000;
/// The subscription version [`Subscription::encode`] writes (what Java and librdkafka write).
pub const SUBSCRIPTION_VERSION: i16 = 3;
/// The newest ConsumerProtocol layout we know; newer versions are read with it and may carry
/// more bytes after it.
pub const NEWEST_KNOWN_VERSION: i16 = 3;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Assignor {
    Range,
    RoundRobin,
    /// KIP-429 incremental rebalancing over a sticky, balanced assignment; see [`sticky`].
    CooperativeSticky,
}

impl Assignor {
    pub fn name(self) -> &'static str {
        match self {
            Assignor::Range => "range",
            Assignor::RoundRobin => "roundrobin",
            Assignor::CooperativeSticky => "cooperative-sticky",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "range" => Some(Self::Range),
            "roundrobin" => Some(Self::RoundRobin),
            "cooperative-sticky" => Some(Self::CooperativeSticky),
            _ => None,
        }
    }

    /// True when members keep their partitions across a rebalance and revoke only those missing
    /// from their new assignment (then rejoin at once); false for the eager protocol, where every
    /// member revokes everything before it rejoins.
    pub fn is_cooperative(self) -> bool {
        matches!(self, Assignor::CooperativeSticky)
    }

    /// Assigns every partition of `partitions` (topic -> count) to at most one member that
    /// subscribes to its topic. `members`: member id -> subscribed topics. Nobody owns anything
    /// here, so cooperative-sticky gives its balanced target at once.
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
                    if subs.is_empty() || count <= 0 {
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
            Assignor::CooperativeSticky => {
                let subs = members
                    .iter()
                    .map(|(m, t)| (m.clone(), Subscription::new(t.clone())))
                    .collect();
                out = sticky::cooperative_sticky(&subs, partitions).assignment;
            }
        }
        out
    }

    /// The leader's call: assigns from each member's decoded subscription. Range and roundrobin
    /// look at the topics only. Cooperative-sticky also weighs the owned partitions and
    /// generations, and returns this round's assignment: its balanced target minus the partitions
    /// still owned by another member (see [`sticky::cooperative_sticky`] for both).
    pub fn assign_subscriptions(
        self,
        members: &BTreeMap<String, Subscription>,
        partitions: &BTreeMap<String, i32>,
    ) -> BTreeMap<String, Vec<Tp>> {
        match self {
            Assignor::CooperativeSticky => {
                sticky::cooperative_sticky(members, partitions).assignment
            }
            _ => {
                let topics = members
                    .iter()
                    .map(|(m, s)| (m.clone(), s.topics.clone()))
                    .collect();
                self.assign(&topics, partitions)
            }
        }
    }
}

/// One member's subscription (ConsumerProtocolSubscription), decoded from any version.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Subscription {
    /// Subscribed topics, in the order sent.
    pub topics: Vec<String>,
    /// Partitions the member owns now (version 1+): topic -> ascending, distinct partition ids.
    pub owned: BTreeMap<String, Vec<i32>>,
    /// The generation in which the member got `owned` (version 2+, or the 4-byte user data of
    /// Java's cooperative-sticky before that); -1 when unknown.
    pub generation: i32,
    /// Rack id (version 3+); our assignors do not use it.
    pub rack: Option<String>,
}

impl Subscription {
    /// Subscribes to `topics`, owning nothing, generation unknown.
    pub fn new(topics: Vec<String>) -> Self {
        Self {
            topics,
            owned: BTreeMap::new(),
            generation: -1,
            rack: None,
        }
    }

    /// Sets the owned partitions (duplicates collapse).
    pub fn with_owned<'a>(mut self, tps: impl IntoIterator<Item = &'a Tp>) -> Self {
        self.owned.clear();
        for (t, p) in tps {
            self.owned.entry(t.clone()).or_default().push(*p);
        }
        for ps in self.owned.values_mut() {
            ps.sort_unstable();
            ps.dedup();
        }
        self
    }

    /// Sets the generation of the owned partitions (negative: unknown).
    pub fn with_generation(mut self, generation: i32) -> Self {
        self.generation = generation.max(-1);
        self
    }

    /// The owned partitions, in (topic, partition) order.
    pub fn owned_partitions(&self) -> impl Iterator<Item = Tp> + '_ {
        self.owned
            .iter()
            .flat_map(|(t, ps)| ps.iter().map(move |p| (t.clone(), *p)))
    }

    /// The bytes for this member's JoinGroup protocol entry of `assignor`: version 3 with the
    /// owned partitions and generation; for cooperative-sticky the user data also carries the
    /// generation (4 bytes, big-endian) as Java's assignor writes it, for pre-3.4 Java leaders.
    /// Names longer than a Kafka string can hold (no topic is) are left out.
    pub fn encode(&self, assignor: Assignor) -> Bytes {
        let mut buf = BytesMut::new();
        buf.put_i16(SUBSCRIPTION_VERSION);
        let topics: Vec<&String> = self.topics.iter().filter(|t| fits(t)).collect();
        buf.put_i32(topics.len() as i32);
        for t in topics {
            put_str(&mut buf, t);
        }
        if assignor == Assignor::CooperativeSticky {
            buf.put_i32(4);
            buf.put_i32(self.generation);
        } else {
            buf.put_i32(-1);
        }
        put_topic_partitions(&mut buf, &self.owned);
        buf.put_i32(self.generation);
        match self.rack.as_deref().filter(|r| fits(r)) {
            Some(r) => put_str(&mut buf, r),
            None => buf.put_i16(-1),
        }
        buf.freeze()
    }

    /// Reads any member's subscription. Versions above [`NEWEST_KNOWN_VERSION`] are read with
    /// its layout and may carry more bytes; known versions must end where their layout ends.
    pub fn decode(bytes: &[u8]) -> Result<Self, String> {
        let mut w = Wire::new(bytes, "subscription");
        let version = w.version()?;
        let count = w.count("topic", 2, MAX_TOPICS)?;
        let mut topics = Vec::with_capacity(count);
        for _ in 0..count {
            topics.push(w.topic()?.to_owned());
        }
        let user_data = w.nullable_bytes("user data")?;
        let owned = if version >= 1 {
            w.topic_partitions("owned")?
        } else {
            BTreeMap::new()
        };
        let mut generation = if version >= 2 {
            w.i32("generation id")?.max(-1)
        } else {
            -1
        };
        let rack = if version >= 3 {
            w.nullable_string("rack id")?
                .map(|r| String::from_utf8_lossy(r).into_owned())
        } else {
            None
        };
        w.end(version)?;
        if generation < 0
            && let Some(&[a, b, c, d]) = user_data
        {
            generation = i32::from_be_bytes([a, b, c, d]).max(-1);
        }
        Ok(Self {
            topics,
            owned,
            generation,
            rack,
        })
    }
}

/// Subscription bytes of version 0 (topics and no user data), as sent before cooperative-sticky.
pub fn encode_subscription(topics: &[String]) -> Bytes {
    let mut buf = BytesMut::new();
    buf.put_i16(0);
    let topics: Vec<&String> = topics.iter().filter(|t| fits(t)).collect();
    buf.put_i32(topics.len() as i32);
    for t in topics {
        put_str(&mut buf, t);
    }
    buf.put_i32(-1);
    buf.freeze()
}

/// The subscribed topics of any member's subscription (see [`Subscription::decode`]).
pub fn decode_subscription(bytes: Bytes) -> Result<Vec<String>, String> {
    Subscription::decode(&bytes).map(|s| s.topics)
}

/// Assignment bytes (version 0, no user data).
pub fn encode_assignment(tps: &[Tp]) -> Bytes {
    let mut by_topic: BTreeMap<String, Vec<i32>> = BTreeMap::new();
    for (t, p) in tps {
        by_topic.entry(t.clone()).or_default().push(*p);
    }
    let mut buf = BytesMut::new();
    buf.put_i16(0);
    put_topic_partitions(&mut buf, &by_topic);
    buf.put_i32(-1);
    buf.freeze()
}

/// Reads the assignment the leader (ours or another client's) sent. Empty bytes: nothing.
/// Negative partition ids, more than [`MAX_PARTITIONS`] partitions or [`MAX_TOPICS`] topics, and
/// malformed bytes are errors.
pub fn decode_assignment(bytes: Bytes) -> Result<BTreeSet<Tp>, String> {
    if bytes.is_empty() {
        return Ok(BTreeSet::new());
    }
    let mut w = Wire::new(&bytes, "assignment");
    let version = w.version()?;
    let assigned = w.topic_partitions("assigned")?;
    w.nullable_bytes("user data")?;
    w.end(version)?;
    Ok(assigned
        .into_iter()
        .flat_map(|(t, ps)| ps.into_iter().map(move |p| (t.clone(), p)))
        .collect())
}

fn fits(s: &str) -> bool {
    s.len() <= i16::MAX as usize
}

fn put_str(buf: &mut BytesMut, s: &str) {
    buf.put_i16(s.len() as i16);
    buf.put_slice(s.as_bytes());
}

fn put_topic_partitions(buf: &mut BytesMut, tps: &BTreeMap<String, Vec<i32>>) {
    let topics: Vec<_> = tps.iter().filter(|(t, _)| fits(t)).collect();
    buf.put_i32(topics.len() as i32);
    for (t, ps) in topics {
        put_str(buf, t);
        buf.put_i32(ps.len() as i32);
        for p in ps {
            buf.put_i32(*p);
        }
    }
}

/// A reader over untrusted ConsumerProtocol bytes: every length is checked before use.
struct Wire<'a> {
    buf: &'a [u8],
    what: &'static str,
}

impl<'a> Wire<'a> {
    fn new(buf: &'a [u8], what: &'static str) -> Self {
        Self { buf, what }
    }

    fn err(&self, why: String) -> String {
        format!("{}: {why}", self.what)
    }

    fn take(&mut self, n: usize, field: &str) -> Result<&'a [u8], String> {
        if self.buf.len() < n {
            return Err(self.err(format!(
                "truncated in the {field}: {n} bytes needed, {} left",
                self.buf.len()
            )));
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    fn i16(&mut self, field: &str) -> Result<i16, String> {
        let b = self.take(2, field)?;
        Ok(i16::from_be_bytes([b[0], b[1]]))
    }

    fn i32(&mut self, field: &str) -> Result<i32, String> {
        let b = self.take(4, field)?;
        Ok(i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn version(&mut self) -> Result<i16, String> {
        let v = self.i16("version")?;
        if v < 0 {
            return Err(self.err(format!("unsupported version {v}")));
        }
        Ok(v)
    }

    /// An array count (no array here is nullable): not negative, at most `max`, and each element
    /// takes at least `min_size` bytes, so the count cannot claim more than the bytes left.
    fn count(&mut self, field: &str, min_size: usize, max: usize) -> Result<usize, String> {
        let n = self.i32(&format!("{field} count"))?;
        if n < 0 {
            return Err(self.err(format!("negative {field} count {n}")));
        }
        let n = n as usize;
        if n > max {
            return Err(self.err(format!("{n} {field} entries, more than the {max} allowed")));
        }
        if n * min_size > self.buf.len() {
            return Err(self.err(format!(
                "{n} {field} entries need at least {} bytes, {} left",
                n * min_size,
                self.buf.len()
            )));
        }
        Ok(n)
    }

    /// A topic name: not null, at most [`MAX_TOPIC_NAME`] bytes, UTF-8.
    fn topic(&mut self) -> Result<&'a str, String> {
        let n = self.i16("topic name length")?;
        if n < 0 {
            return Err(self.err(format!("topic name with length {n}")));
        }
        if n as usize > MAX_TOPIC_NAME {
            return Err(self.err(format!(
                "topic name of {n} bytes, longer than the {MAX_TOPIC_NAME} Kafka allows"
            )));
        }
        let b = self.take(n as usize, "topic name")?;
        std::str::from_utf8(b).map_err(|_| self.err("topic name is not UTF-8".into()))
    }

    fn nullable_bytes(&mut self, field: &str) -> Result<Option<&'a [u8]>, String> {
        match self.i32(&format!("{field} length"))? {
            -1 => Ok(None),
            n if n < 0 => Err(self.err(format!("{field} with length {n}"))),
            n => self.take(n as usize, field).map(Some),
        }
    }

    fn nullable_string(&mut self, field: &str) -> Result<Option<&'a [u8]>, String> {
        match self.i16(&format!("{field} length"))? {
            -1 => Ok(None),
            n if n < 0 => Err(self.err(format!("{field} with length {n}"))),
            n => self.take(n as usize, field).map(Some),
        }
    }

    /// `[topic [partition]]`: at most [`MAX_TOPICS`] entries and [`MAX_PARTITIONS`] partitions
    /// in all, no negative partition id. Entries of one topic merge; ids come out sorted, distinct.
    fn topic_partitions(&mut self, what: &str) -> Result<BTreeMap<String, Vec<i32>>, String> {
        // An entry is at least a name length and a partition count.
        let topics = self.count(&format!("{what} topic"), 2 + 4, MAX_TOPICS)?;
        let mut out: BTreeMap<String, Vec<i32>> = BTreeMap::new();
        let mut total = 0usize;
        for _ in 0..topics {
            let topic = self.topic()?;
            let n = self.count(&format!("{what} partition"), 4, MAX_PARTITIONS)?;
            total += n;
            if total > MAX_PARTITIONS {
                return Err(self.err(format!(
                    "more than {MAX_PARTITIONS} {what} partitions in all"
                )));
            }
            let ps = out.entry(topic.to_owned()).or_default();
            ps.reserve(n);
            for _ in 0..n {
                let p = self.i32("partition id")?;
                if p < 0 {
                    return Err(self.err(format!("negative partition id {p} of {topic}")));
                }
                ps.push(p);
            }
        }
        for ps in out.values_mut() {
            ps.sort_unstable();
            ps.dedup();
        }
        Ok(out)
    }

    /// Known versions end with their layout; newer ones may carry fields we do not know.
    fn end(&self, version: i16) -> Result<(), String> {
        if version <= NEWEST_KNOWN_VERSION && !self.buf.is_empty() {
            return Err(self.err(format!(
                "{} bytes after the end of a version {version} layout",
                self.buf.len()
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use kafka_protocol::{
        messages::{
            ConsumerProtocolAssignment, ConsumerProtocolSubscription, TopicName,
            consumer_protocol_assignment::TopicPartition as AssignedTopic,
            consumer_protocol_subscription::TopicPartition as OwnedTopic,
        },
        protocol::{Decodable, Encodable, StrBytes},
    };

    /// Records the largest single allocation made on the calling thread inside [`largest`]
    /// (test builds only), so tests can show that hostile lengths allocate nothing big.
    mod probe {
        use std::{
            alloc::{GlobalAlloc, Layout, System},
            cell::Cell,
        };

        thread_local! {
            static LARGEST: Cell<Option<usize>> = const { Cell::new(None) };
        }

        fn note(size: usize) {
            let _ = LARGEST.try_with(|c| {
                if let Some(m) = c.get()
                    && size > m
                {
                    c.set(Some(size));
                }
            });
        }

        pub struct Probe;

        // SAFETY: forwards every call to the system allocator unchanged.
        unsafe impl GlobalAlloc for Probe {
            unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
                note(layout.size());
                unsafe { System.alloc(layout) }
            }
            unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
                note(layout.size());
                unsafe { System.alloc_zeroed(layout) }
            }
            unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
                note(new_size);
                unsafe { System.realloc(ptr, layout, new_size) }
            }
            unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
                unsafe { System.dealloc(ptr, layout) }
            }
        }

        #[global_allocator]
        static GLOBAL: Probe = Probe;

        /// Runs `f`; returns its result and the largest allocation it made on this thread.
        pub fn largest<T>(f: impl FnOnce() -> T) -> (T, usize) {
            LARGEST.with(|c| c.set(Some(0)));
            let r = f();
            let m = LARGEST.with(|c| c.replace(None)).unwrap_or(0);
            (r, m)
        }
    }

    /// Hand-built protocol bytes.
    #[derive(Clone)]
    struct Raw(Vec<u8>);

    impl Raw {
        fn v(version: i16) -> Self {
            Raw(version.to_be_bytes().to_vec())
        }
        fn i16(mut self, x: i16) -> Self {
            self.0.extend(x.to_be_bytes());
            self
        }
        fn i32(mut self, x: i32) -> Self {
            self.0.extend(x.to_be_bytes());
            self
        }
        fn s(self, x: &str) -> Self {
            self.i16(x.len() as i16).raw(x.as_bytes())
        }
        fn raw(mut self, x: &[u8]) -> Self {
            self.0.extend(x);
            self
        }
        fn bytes(&self) -> Bytes {
            Bytes::from(self.0.clone())
        }
    }

    fn sp(s: &str) -> StrBytes {
        StrBytes::from_string(s.to_owned())
    }

    /// kafka-protocol's encoding of one subscription per version (the reference layout), and
    /// what we must read from it.
    fn reference_subscription(version: i16) -> (Bytes, Subscription) {
        let layout = version.min(3);
        let mut sub = ConsumerProtocolSubscription::default()
            .with_topics(vec![sp("in"), sp("other")])
            .with_user_data(Some(Bytes::from_static(b"opaque")));
        let mut want = Subscription::new(vec!["in".into(), "other".into()]);
        if layout >= 1 {
            sub = sub.with_owned_partitions(vec![
                OwnedTopic::default()
                    .with_topic(TopicName(sp("in")))
                    .with_partitions(vec![3, 1, 3]),
                OwnedTopic::default()
                    .with_topic(TopicName(sp("x")))
                    .with_partitions(vec![0]),
            ]);
            want = want.with_owned(&[("in".into(), 1), ("in".into(), 3), ("x".into(), 0)]);
        }
        if layout >= 2 {
            sub = sub.with_generation_id(7);
            want.generation = 7;
        }
        if layout >= 3 {
            sub = sub.with_rack_id(Some(sp("rack-a")));
            want.rack = Some("rack-a".into());
        }
        let mut buf = BytesMut::new();
        buf.put_i16(version);
        sub.encode(&mut buf, layout).unwrap();
        if version > 3 {
            buf.put_slice(b"a field from the future");
        }
        (buf.freeze(), want)
    }

    fn reference_assignment(version: i16) -> Bytes {
        let a = ConsumerProtocolAssignment::default()
            .with_assigned_partitions(vec![
                AssignedTopic::default()
                    .with_topic(TopicName(sp("in")))
                    .with_partitions(vec![2, 0]),
                AssignedTopic::default()
                    .with_topic(TopicName(sp("x")))
                    .with_partitions(vec![5]),
            ])
            .with_user_data(Some(Bytes::from_static(b"ud")));
        let mut buf = BytesMut::new();
        buf.put_i16(version);
        a.encode(&mut buf, version.min(3)).unwrap();
        if version > 3 {
            buf.put_slice(b"future");
        }
        buf.freeze()
    }

    /// Decodes hostile bytes: must fail, and allocate nothing near what the lengths claim.
    fn rejects_sub(raw: &Raw, why: &str) {
        let (r, largest) = probe::largest(|| Subscription::decode(&raw.0));
        let e = r.expect_err(why);
        assert!(
            largest < 16 * 1024,
            "{why}: allocated {largest} bytes ({e})"
        );
    }

    fn rejects_assignment(raw: &Raw, why: &str) {
        let (r, largest) = probe::largest(|| decode_assignment(raw.bytes()));
        let e = r.expect_err(why);
        assert!(
            largest < 16 * 1024,
            "{why}: allocated {largest} bytes ({e})"
        );
    }

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
        for a in [
            Assignor::Range,
            Assignor::RoundRobin,
            Assignor::CooperativeSticky,
        ] {
            let out = a.assign(&m, &parts);
            check_complete(&out, &parts);
            assert!(out["b"].iter().all(|(t, _)| t == "t"));
            assert!(out["c"].iter().all(|(t, _)| t == "u"));
        }
        for a in [Assignor::RoundRobin, Assignor::CooperativeSticky] {
            let out = a.assign(&m, &parts);
            let sizes: Vec<usize> = out.values().map(Vec::len).collect();
            assert!(
                sizes.iter().max().unwrap() - sizes.iter().min().unwrap() <= 1,
                "{a:?}: {out:?}"
            );
        }
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
    fn negative_partition_counts_assign_nothing() {
        let m = members(&[("a", &["t"]), ("b", &["t"])]);
        let parts = BTreeMap::from([("t".to_string(), -5)]);
        for a in [
            Assignor::Range,
            Assignor::RoundRobin,
            Assignor::CooperativeSticky,
        ] {
            assert!(a.assign(&m, &parts).values().all(Vec::is_empty), "{a:?}");
        }
    }

    #[test]
    fn names_round_trip() {
        for a in [
            Assignor::Range,
            Assignor::RoundRobin,
            Assignor::CooperativeSticky,
        ] {
            assert_eq!(Assignor::from_name(a.name()), Some(a));
        }
        assert_eq!(
            Assignor::CooperativeSticky.name(),
            "cooperative-sticky",
            "the name Java and librdkafka use"
        );
        assert!(Assignor::CooperativeSticky.is_cooperative());
        assert!(!Assignor::Range.is_cooperative());
        assert_eq!(Assignor::from_name("sticky"), None);
    }

    #[test]
    fn protocol_bytes_round_trip() {
        let sub = encode_subscription(&["in".into(), "other".into()]);
        assert_eq!(decode_subscription(sub.clone()).unwrap(), ["in", "other"]);
        // kafka-protocol reads what we write.
        let mut b = sub.slice(2..);
        let theirs = ConsumerProtocolSubscription::decode(&mut b, 0).unwrap();
        assert_eq!(theirs.topics, [sp("in"), sp("other")]);
        assert_eq!(theirs.user_data, None);

        let tps = vec![
            ("in".to_string(), 3),
            ("in".to_string(), 0),
            ("x".to_string(), 1),
        ];
        let bytes = encode_assignment(&tps);
        let got = decode_assignment(bytes.clone()).unwrap();
        assert_eq!(got, tps.into_iter().collect());
        let mut b = bytes.slice(2..);
        let theirs = ConsumerProtocolAssignment::decode(&mut b, 0).unwrap();
        assert_eq!(theirs.assigned_partitions.len(), 2);
        assert!(decode_assignment(Bytes::new()).unwrap().is_empty());
        assert!(decode_subscription(Bytes::from_static(&[0, 0, 0xff])).is_err());
    }

    #[test]
    fn subscription_v3_round_trips_through_kafka_protocol() {
        let ours = Subscription::new(vec!["in".into(), "b".into()])
            .with_owned(&[("in".into(), 4), ("in".into(), 1), ("b".into(), 0)])
            .with_generation(12);
        for a in [Assignor::Range, Assignor::CooperativeSticky] {
            let bytes = ours.encode(a);
            assert_eq!(&bytes[..2], &SUBSCRIPTION_VERSION.to_be_bytes());
            assert_eq!(Subscription::decode(&bytes).unwrap(), ours);
            let mut b = bytes.slice(2..);
            let theirs = ConsumerProtocolSubscription::decode(&mut b, 3).unwrap();
            assert!(b.is_empty());
            assert_eq!(theirs.topics, [sp("in"), sp("b")]);
            assert_eq!(theirs.generation_id, 12);
            assert_eq!(theirs.rack_id, None);
            let owned: Vec<(String, Vec<i32>)> = theirs
                .owned_partitions
                .iter()
                .map(|t| (t.topic.0.to_string(), t.partitions.clone()))
                .collect();
            assert_eq!(owned, [("b".into(), vec![0]), ("in".into(), vec![1, 4])]);
            // Java's cooperative-sticky user data: the generation, 4 bytes.
            let want = (a == Assignor::CooperativeSticky)
                .then(|| Bytes::copy_from_slice(&12i32.to_be_bytes()));
            assert_eq!(theirs.user_data, want);
        }
        assert_eq!(
            ours.owned_partitions().collect::<Vec<_>>(),
            [("b".into(), 0), ("in".into(), 1), ("in".into(), 4)]
        );
    }

    #[test]
    fn subscriptions_of_every_version_decode() {
        for v in 0..=5 {
            let (bytes, want) = reference_subscription(v);
            assert_eq!(Subscription::decode(&bytes).unwrap(), want, "version {v}");
            assert_eq!(
                decode_subscription(bytes).unwrap(),
                ["in", "other"],
                "version {v}"
            );
        }
    }

    #[test]
    fn generation_from_java_user_data_or_field() {
        // Java 2.4-3.3 cooperative-sticky: version 1, generation only in the 4-byte user data.
        let java = Raw::v(1)
            .i32(1)
            .s("t")
            .i32(4)
            .i32(9)
            .i32(1)
            .s("t")
            .i32(1)
            .i32(0);
        let s = Subscription::decode(&java.0).unwrap();
        assert_eq!(s.generation, 9);
        assert_eq!(s.owned_partitions().collect::<Vec<_>>(), [("t".into(), 0)]);
        // librdkafka <= 2.1 sticky user data ([partitions] generation, > 4 bytes): unknown.
        let user_data = Raw(vec![]).i32(1).s("t").i32(1).i32(0).i32(3);
        let rdkafka_old = Raw::v(1)
            .i32(1)
            .s("t")
            .i32(user_data.0.len() as i32)
            .raw(&user_data.0)
            .i32(1)
            .s("t")
            .i32(1)
            .i32(0);
        assert_eq!(Subscription::decode(&rdkafka_old.0).unwrap().generation, -1);
        // librdkafka >= 2.2: version 3, empty (not null) user data, field set, rack null.
        let rdkafka = Raw::v(3)
            .i32(1)
            .s("t")
            .i32(0)
            .i32(1)
            .s("t")
            .i32(2)
            .i32(1)
            .i32(0)
            .i32(6)
            .i16(-1);
        let s = Subscription::decode(&rdkafka.0).unwrap();
        assert_eq!(s.generation, 6);
        assert_eq!(s.owned["t"], [0, 1]);
        assert_eq!(s.rack, None);
        // The field wins over the user data; a field of -1 falls back to the user data.
        let both = |field: i32| Raw::v(2).i32(1).s("t").i32(4).i32(5).i32(0).i32(field);
        assert_eq!(Subscription::decode(&both(8).0).unwrap().generation, 8);
        assert_eq!(Subscription::decode(&both(-1).0).unwrap().generation, 5);
        assert_eq!(Subscription::decode(&both(-9).0).unwrap().generation, 5);
    }

    #[test]
    fn truncated_subscriptions_are_rejected_at_every_length() {
        for v in 0..=4 {
            let (bytes, _) = reference_subscription(v);
            let layout_len = reference_subscription(v.min(3)).0.len();
            for cut in 0..layout_len {
                rejects_sub(&Raw(bytes[..cut].to_vec()), &format!("v{v} cut at {cut}"));
            }
        }
    }

    #[test]
    fn trailing_junk_is_rejected_for_known_versions_only() {
        for v in 0..=3 {
            let (bytes, _) = reference_subscription(v);
            rejects_sub(&Raw(bytes.to_vec()).raw(&[0]), &format!("v{v} + junk"));
            let a = reference_assignment(v);
            rejects_assignment(&Raw(a.to_vec()).raw(b"junk"), &format!("v{v} + junk"));
        }
        // A newer version may carry fields we do not know: read as version 3.
        let (bytes, want) = reference_subscription(4);
        assert_eq!(Subscription::decode(&bytes).unwrap(), want);
        assert_eq!(decode_assignment(reference_assignment(4)).unwrap().len(), 3);
    }

    #[test]
    fn hostile_subscriptions_are_rejected_without_allocating() {
        rejects_sub(&Raw::v(-1).i32(0).i32(-1), "negative version");
        rejects_sub(&Raw(vec![0]), "one byte");
        for v in 0..=4 {
            let w = |why: &str| format!("v{v}: {why}");
            // Topic counts.
            for n in [i32::MAX, 1 << 24, MAX_TOPICS as i32 + 1] {
                rejects_sub(&Raw::v(v).i32(n).s("t"), &w(&format!("{n} topics")));
            }
            for n in [-1, -2, i32::MIN] {
                rejects_sub(&Raw::v(v).i32(n).i32(-1), &w(&format!("{n} topics")));
            }
            // More topics than bytes could hold, under the cap.
            rejects_sub(
                &Raw::v(v).i32(5000).raw(&[0; 64]),
                &w("5000 topics, 64 bytes"),
            );
            // Topic name lengths.
            for n in [-1, -2, i16::MIN, 250, i16::MAX] {
                rejects_sub(
                    &Raw::v(v).i32(1).i16(n).raw(&[b'a'; 300]).i32(-1),
                    &w(&format!("topic name length {n}")),
                );
            }
            rejects_sub(
                &Raw::v(v).i32(1).i16(2).raw(&[0xff, 0xfe]).i32(-1),
                &w("non-UTF-8 topic"),
            );
            // User data lengths.
            for n in [i32::MAX, 1 << 30, -2, i32::MIN] {
                rejects_sub(
                    &Raw::v(v).i32(1).s("t").i32(n).raw(&[0; 8]),
                    &w(&format!("user data length {n}")),
                );
            }
            if v >= 1 {
                let owned = |topics: i32| Raw::v(v).i32(1).s("t").i32(-1).i32(topics);
                for n in [i32::MAX, 1 << 20, -1, i32::MIN] {
                    rejects_sub(&owned(n).s("t"), &w(&format!("{n} owned topics")));
                }
                for n in [i32::MAX, 1 << 28, MAX_PARTITIONS as i32 + 1, -1, i32::MIN] {
                    rejects_sub(
                        &owned(1).s("t").i32(n).i32(0),
                        &w(&format!("{n} owned partitions")),
                    );
                }
                rejects_sub(
                    &owned(1).s("t").i32(2).i32(0).i32(-3).i32(0).i16(-1),
                    &w("negative partition id"),
                );
                rejects_sub(&owned(1).i16(-1).i32(0), &w("null owned topic"));
            }
            if v >= 3 {
                let rack = |n: i16| {
                    Raw::v(v)
                        .i32(1)
                        .s("t")
                        .i32(-1)
                        .i32(0)
                        .i32(1)
                        .i16(n)
                        .raw(b"r")
                };
                rejects_sub(&rack(-2), &w("rack length -2"));
                rejects_sub(&rack(i16::MAX), &w("rack length 32767"));
                assert_eq!(
                    Subscription::decode(&rack(1).0).unwrap().rack.as_deref(),
                    Some("r")
                );
            }
        }
    }

    #[test]
    fn partition_total_is_capped_across_topics() {
        // Two entries of 60 000 partitions each: every count fits the bytes, the total does not
        // fit the cap.
        let half = 60_000;
        let mut raw = Raw::v(1).i32(1).s("t").i32(-1).i32(2);
        for t in ["a", "b"] {
            raw = raw.s(t).i32(half).raw(&vec![0; half as usize * 4]);
        }
        let (r, largest) = probe::largest(|| Subscription::decode(&raw.0));
        assert!(r.unwrap_err().contains("partitions in all"));
        assert!(largest <= half as usize * 4 + 4096, "{largest}");
        // Under the cap the same shape decodes.
        let mut raw = Raw::v(1).i32(1).s("t").i32(-1).i32(2);
        for t in ["a", "b"] {
            raw = raw.s(t).i32(3).i32(2).i32(1).i32(2);
        }
        let s = Subscription::decode(&raw.0).unwrap();
        assert_eq!(s.owned["a"], [1, 2]);
        assert_eq!(s.owned["b"], [1, 2]);
    }

    #[test]
    fn assignments_of_every_version_decode() {
        let want: BTreeSet<Tp> = [("in".into(), 0), ("in".into(), 2), ("x".into(), 5)].into();
        for v in 0..=5 {
            assert_eq!(
                decode_assignment(reference_assignment(v)).unwrap(),
                want,
                "v{v}"
            );
        }
        // librdkafka writes version 0 with null user data; duplicated entries merge.
        let dup = Raw::v(0)
            .i32(2)
            .s("t")
            .i32(2)
            .i32(1)
            .i32(1)
            .s("t")
            .i32(1)
            .i32(0)
            .i32(-1);
        assert_eq!(
            decode_assignment(dup.bytes()).unwrap(),
            [("t".into(), 0), ("t".into(), 1)].into()
        );
    }

    #[test]
    fn hostile_assignments_are_rejected_without_allocating() {
        rejects_assignment(&Raw(vec![0]), "one byte");
        rejects_assignment(&Raw::v(-3).i32(0).i32(-1), "negative version");
        for v in 0..=4 {
            let w = |why: &str| format!("v{v}: {why}");
            let a = reference_assignment(v);
            let layout_len = reference_assignment(v.min(3)).len();
            for cut in 1..layout_len {
                rejects_assignment(&Raw(a[..cut].to_vec()), &w(&format!("cut at {cut}")));
            }
            for n in [i32::MAX, 1 << 20, MAX_TOPICS as i32 + 1, -1, i32::MIN] {
                rejects_assignment(&Raw::v(v).i32(n).s("t"), &w(&format!("{n} topics")));
            }
            for n in [i32::MAX, 1 << 28, MAX_PARTITIONS as i32 + 1, -1, i32::MIN] {
                rejects_assignment(
                    &Raw::v(v).i32(1).s("t").i32(n).i32(0).i32(-1),
                    &w(&format!("{n} partitions")),
                );
            }
            for n in [-1, -7, 250, i16::MAX] {
                rejects_assignment(
                    &Raw::v(v).i32(1).i16(n).raw(&[b'a'; 260]).i32(0).i32(-1),
                    &w(&format!("topic name length {n}")),
                );
            }
            rejects_assignment(
                &Raw::v(v).i32(1).s("t").i32(1).i32(-1).i32(-1),
                &w("negative partition id"),
            );
            for n in [i32::MAX, -2, i32::MIN] {
                rejects_assignment(
                    &Raw::v(v).i32(0).i32(n).raw(&[0; 16]),
                    &w(&format!("user data length {n}")),
                );
            }
        }
    }

    #[test]
    fn assign_subscriptions_matches_assign_for_eager_assignors() {
        let m = members(&[("a", &["t", "u"]), ("b", &["t"])]);
        let subs: BTreeMap<String, Subscription> = m
            .iter()
            .map(|(id, t)| {
                let owned = [("t".to_string(), 0)];
                (id.clone(), Subscription::new(t.clone()).with_owned(&owned))
            })
            .collect();
        let parts = BTreeMap::from([("t".to_string(), 5), ("u".to_string(), 2)]);
        for a in [Assignor::Range, Assignor::RoundRobin] {
            assert_eq!(a.assign_subscriptions(&subs, &parts), a.assign(&m, &parts));
        }
    }

    #[test]
    fn mutated_subscriptions_that_decode_survive_our_encoding() {
        // Seeded byte flips, truncations and insertions of every reference version.
        let mut state = 0x0ddc_0ffe_u64;
        let mut rnd = |n: usize| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % n as u64) as usize
        };
        let mut decoded = 0;
        for round in 0..4000 {
            let (base, _) = reference_subscription((round % 5) as i16);
            let mut b = base.to_vec();
            for _ in 0..1 + rnd(3) {
                match rnd(3) {
                    0 if !b.is_empty() => {
                        let i = rnd(b.len());
                        b[i] = rnd(256) as u8;
                    }
                    1 => b.truncate(rnd(b.len() + 1)),
                    _ => {
                        let i = rnd(b.len() + 1);
                        b.insert(i, rnd(256) as u8);
                    }
                }
            }
            let (r, largest) = probe::largest(|| Subscription::decode(&b));
            assert!(largest < 64 * 1024, "{b:?}: {largest} bytes");
            if let Ok(sub) = r {
                decoded += 1;
                for a in [Assignor::Range, Assignor::CooperativeSticky] {
                    assert_eq!(
                        Subscription::decode(&sub.encode(a)),
                        Ok(sub.clone()),
                        "{b:?}"
                    );
                }
            }
        }
        assert!(decoded > 100, "only {decoded} mutants decoded");
    }
}
