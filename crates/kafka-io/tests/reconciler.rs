//! The consumer's membership reconciler against a fake one-broker cluster (tests/fake_broker):
//! a whole `kafka_io::Consumer` (rskafka metadata and ListOffsets, our group calls and fetches)
//! whose coordinator is scripted: the assignment (another member leads the group), the
//! protocol (cooperative-sticky or range), rebalances, lost generations, partition counts and
//! fatal join errors.
//!
//! Real time, short durations: session timeout 1.5 s, heartbeat 300 ms, drain timeout 1 s.
//! Every wait is bounded.

mod fake_broker;

use std::{
    collections::BTreeSet,
    sync::{Arc, Mutex},
    time::Duration,
};

use fake_broker::{FakeBroker, Seen, Tp};
use kafka_io::{Acker, Consumer, ConsumerConfig, GroupConfig, PartitionStream, StreamState};
use kafka_protocol::{error::ResponseError, messages::ApiKey};
use tokio::{sync::watch, task::JoinHandle, time::Instant};

const TOPIC: &str = "in";

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn tps(ps: &[i32]) -> Vec<Tp> {
    ps.iter().map(|p| (TOPIC.to_owned(), *p)).collect()
}

fn config(metadata_refresh: Duration) -> ConsumerConfig {
    let mut g = GroupConfig::new("g", vec![TOPIC.to_owned()]);
    g.session_timeout = ms(1500);
    g.heartbeat_interval = ms(300);
    g.rebalance_timeout = ms(1000);
    let mut c = ConsumerConfig::new(g);
    c.fetch_max_wait = ms(50);
    c.drain_timeout = ms(1000);
    c.metadata_refresh = metadata_refresh;
    c
}

async fn start(fake: &FakeBroker, metadata_refresh: Duration) -> Consumer {
    let cluster = tokio::time::timeout(ms(5000), fake.cluster())
        .await
        .expect("Cluster::connect within 5 s");
    Consumer::start(cluster, config(metadata_refresh), None)
}

/// The next `n` streams, within `within`.
async fn next_streams(c: &mut Consumer, n: usize, within: Duration) -> Vec<PartitionStream> {
    let deadline = Instant::now() + within;
    let mut out = Vec::new();
    while out.len() < n {
        match tokio::time::timeout_at(deadline, c.next_stream()).await {
            Ok(Some(s)) => out.push(s),
            Ok(None) => panic!(
                "consumer ended after {} streams: {:?}",
                out.len(),
                c.fatal_error()
            ),
            Err(_) => panic!("only {} of {n} streams within {within:?}", out.len()),
        }
    }
    out.sort_by_key(|s| s.partition);
    out
}

/// A stream's worker: completes records at once, or (`hold`) keeps them in flight until the
/// stream drains (as a worker finishing its in-flight calls), and logs every state it sees.
struct Worker {
    partition: i32,
    epoch: u64,
    states: Arc<Mutex<Vec<StreamState>>>,
    received: Arc<Mutex<Vec<i64>>>,
    /// A receiver nobody reads: `has_changed` says whether the state was ever sent again.
    untouched: watch::Receiver<StreamState>,
    committed: watch::Receiver<i64>,
    task: JoinHandle<()>,
}

impl Worker {
    fn spawn(mut s: PartitionStream, acker: Acker, hold: bool) -> Self {
        let states = Arc::new(Mutex::new(vec![*s.state().borrow()]));
        let received = Arc::new(Mutex::new(Vec::new()));
        let untouched = s.state();
        let committed = s.committed();
        let (partition, epoch) = (s.partition, s.epoch);
        let (st, rc) = (states.clone(), received.clone());
        let task = tokio::spawn(async move {
            let mut state = s.state();
            let mut held = Vec::new();
            loop {
                let cur = *state.borrow_and_update();
                {
                    let mut v = st.lock().unwrap();
                    if v.last() != Some(&cur) {
                        v.push(cur);
                    }
                }
                match cur {
                    StreamState::Active => tokio::select! {
                        b = s.recv() => match b {
                            Some(b) => for r in &b.records {
                                rc.lock().unwrap().push(r.offset);
                                let t = b.token(r.offset);
                                if hold { held.push(t) } else { acker.complete(&t) }
                            },
                            None => if state.changed().await.is_err() { return },
                        },
                        r = state.changed() => if r.is_err() { return },
                    },
                    StreamState::Draining => {
                        for t in held.drain(..) {
                            acker.complete(&t);
                        }
                        if state.changed().await.is_err() {
                            return;
                        }
                    }
                    StreamState::Revoked => return,
                }
            }
        });
        Self {
            partition,
            epoch,
            states,
            received,
            untouched,
            committed,
            task,
        }
    }

    fn states(&self) -> Vec<StreamState> {
        self.states.lock().unwrap().clone()
    }

    fn received(&self) -> Vec<i64> {
        self.received.lock().unwrap().clone()
    }

    fn revoked(&self) -> bool {
        self.states().last() == Some(&StreamState::Revoked)
    }
}

/// Polls `f` every 5 ms for at most `within`.
async fn until(within: Duration, what: &str, f: impl Fn() -> bool) {
    let deadline = Instant::now() + within;
    while !f() {
        assert!(Instant::now() < deadline, "not within {within:?}: {what}");
        tokio::time::sleep(ms(5)).await;
    }
}

fn spawn_all(
    streams: Vec<PartitionStream>,
    acker: &Acker,
    hold: impl Fn(i32) -> bool,
) -> Vec<Worker> {
    streams
        .into_iter()
        .map(|s| {
            let h = hold(s.partition);
            Worker::spawn(s, acker.clone(), h)
        })
        .collect()
}

fn committed_between(commits: &[Seen], p: i32, offset: i64, from: Instant, to: Instant) -> bool {
    commits
        .iter()
        .any(|c| c.ok() && c.commits(TOPIC, p, offset) && c.at > from && c.at < to)
}

async fn close(mut c: Consumer, fake: &FakeBroker) {
    tokio::time::timeout(ms(5000), c.close())
        .await
        .expect("close within 5 s");
    assert!(
        !fake.of(ApiKey::LeaveGroup).is_empty(),
        "LeaveGroup sent on close"
    );
}

/// Cooperative: a rebalance that takes partitions 2 and 3 away drains them (their in-flight
/// records complete), commits their positions, revokes them, and rejoins at once (KIP-429);
/// partitions 0 and 1 never change state and no stream is handed out again.
#[tokio::test]
async fn cooperative_rebalance_revokes_only_what_moves_and_rejoins() {
    let fake = FakeBroker::start(&[(TOPIC, 4)]).await;
    fake.protocol("cooperative-sticky");
    fake.assign(&tps(&[0, 1, 2, 3]));
    for p in 0..4 {
        fake.log_end(TOPIC, p, 3);
    }
    let mut c = start(&fake, Duration::from_secs(30)).await;
    let acker = c.acker();
    let streams = next_streams(&mut c, 4, ms(5000)).await;
    assert_eq!(
        streams.iter().map(|s| s.partition).collect::<Vec<_>>(),
        vec![0, 1, 2, 3]
    );
    let workers = spawn_all(streams, &acker, |p| p >= 2);
    // 0 and 1 complete at once and are committed; 2 and 3 hold their three records.
    fake.wait_for(ms(3000), |s| {
        s.iter()
            .any(|c| c.api == ApiKey::OffsetCommit && c.ok() && c.commits(TOPIC, 0, 3))
            && s.iter()
                .any(|c| c.api == ApiKey::OffsetCommit && c.ok() && c.commits(TOPIC, 1, 3))
    })
    .await
    .expect("partitions 0 and 1 committed at 3");
    until(ms(3000), "2 and 3 received their records", || {
        workers[2].received() == [0, 1, 2] && workers[3].received() == [0, 1, 2]
    })
    .await;
    assert_eq!(fake.joins().len(), 1);
    // Nothing committed: the start came from ListOffsets (rskafka), the records from Fetch.
    assert!(!fake.of(ApiKey::ListOffsets).is_empty());
    assert!(fake.of(ApiKey::Fetch).iter().all(|f| f.version == 12));
    for p in [2, 3] {
        // (The reset position may be committed; nothing past it.)
        assert_eq!(
            fake.committed(TOPIC, p).unwrap_or(0),
            0,
            "held records are not committed"
        );
    }

    let rebalance_at = Instant::now();
    fake.rebalance(&tps(&[0, 1]));
    until(ms(5000), "streams 2 and 3 revoked", || {
        workers[2].revoked() && workers[3].revoked()
    })
    .await;
    let seen = fake
        .wait_for(ms(3000), |s| {
            s.iter()
                .filter(|r| r.api == ApiKey::JoinGroup && r.ok())
                .count()
                >= 3
        })
        .await
        .expect("a third JoinGroup (the KIP-429 rejoin after revoking)");
    let joins: Vec<&Seen> = seen
        .iter()
        .filter(|r| r.api == ApiKey::JoinGroup && r.ok())
        .collect();
    assert!(joins[1].at > rebalance_at);
    let commits: Vec<Seen> = seen
        .iter()
        .filter(|r| r.api == ApiKey::OffsetCommit)
        .cloned()
        .collect();
    for p in [2, 3] {
        assert_eq!(
            workers[p as usize].states(),
            [
                StreamState::Active,
                StreamState::Draining,
                StreamState::Revoked
            ],
            "partition {p}"
        );
        assert_eq!(
            *workers[p as usize].committed.borrow(),
            3,
            "the stream's committed watch saw the revoke commit"
        );
        assert!(
            committed_between(&commits, p, 3, joins[1].at, joins[2].at),
            "partition {p}'s completed position committed between the rebalance's JoinGroup and the rejoin: {commits:#?}"
        );
    }
    // The rejoin follows the revocation at once, not after another heartbeat's news.
    let last_commit = commits
        .iter()
        .filter(|c| c.at < joins[2].at)
        .map(|c| c.at)
        .max()
        .expect("a commit");
    assert!(
        joins[2].at - last_commit < ms(500),
        "rejoin {:?} after the revoke commit",
        joins[2].at - last_commit
    );
    assert!(
        !seen.iter().any(|r| r.api == ApiKey::Heartbeat
            && r.at > joins[1].at
            && r.at < joins[2].at
            && r.code == ResponseError::RebalanceInProgress.code()),
        "no REBALANCE_IN_PROGRESS needed for the rejoin"
    );
    for w in &workers[..2] {
        assert_eq!(
            w.states(),
            [StreamState::Active],
            "partition {}",
            w.partition
        );
        assert!(
            matches!(w.untouched.has_changed(), Ok(false)),
            "partition {}'s state was never sent again",
            w.partition
        );
    }
    assert!(
        tokio::time::timeout(ms(300), c.next_stream())
            .await
            .is_err(),
        "no new stream: 0 and 1 were kept"
    );
    assert_eq!(*c.assignment().borrow(), fake_broker::set(&tps(&[0, 1])));
    // 0 and 1 still flow.
    fake.log_end(TOPIC, 0, 5);
    until(ms(3000), "partition 0 goes on", || {
        workers[0].received() == [0, 1, 2, 3, 4]
    })
    .await;
    close(c, &fake).await;
    for w in workers {
        w.task.abort();
    }
}

/// Eager (range): a rebalance drains and commits every partition, revokes them all before the
/// next JoinGroup, then hands out streams of the new assignment with new epochs, starting at
/// the committed positions.
#[tokio::test]
async fn eager_rebalance_revokes_everything_commits_then_starts_new_streams() {
    let fake = FakeBroker::start(&[(TOPIC, 4)]).await;
    fake.protocol("range");
    fake.assign(&tps(&[0, 1, 2, 3]));
    for p in 0..4 {
        fake.log_end(TOPIC, p, 3);
    }
    let mut c = start(&fake, Duration::from_secs(30)).await;
    let acker = c.acker();
    let workers = spawn_all(next_streams(&mut c, 4, ms(5000)).await, &acker, |_| true);
    until(ms(3000), "every partition received its records", || {
        workers.iter().all(|w| w.received() == [0, 1, 2])
    })
    .await;
    assert!(
        fake.commits()
            .iter()
            .all(|c| c.offsets.iter().all(|o| o.2 == 0)),
        "held records are not committed"
    );

    let rebalance_at = Instant::now();
    fake.rebalance(&tps(&[0, 1]));
    until(ms(5000), "every stream revoked", || {
        workers.iter().all(Worker::revoked)
    })
    .await;
    let fresh = next_streams(&mut c, 2, ms(5000)).await;
    let joins = fake.joins();
    assert_eq!(joins.len(), 2, "{joins:#?}");
    let commits = fake.commits();
    for w in &workers {
        assert_eq!(
            w.states(),
            [
                StreamState::Active,
                StreamState::Draining,
                StreamState::Revoked
            ],
            "partition {}",
            w.partition
        );
        assert!(
            committed_between(&commits, w.partition, 3, rebalance_at, joins[1].at),
            "partition {} committed at 3 before the next JoinGroup: {commits:#?}",
            w.partition
        );
    }
    let old_epoch = workers.iter().map(|w| w.epoch).max().unwrap();
    assert_eq!(
        fresh.iter().map(|s| s.partition).collect::<Vec<_>>(),
        vec![0, 1]
    );
    for s in &fresh {
        assert!(s.epoch > old_epoch, "new epoch {} > {old_epoch}", s.epoch);
        assert_eq!(
            *s.committed().borrow(),
            3,
            "starts at the committed position"
        );
        assert_eq!(*s.state().borrow(), StreamState::Active);
    }
    let fresh = spawn_all(fresh, &acker, |_| false);
    fake.log_end(TOPIC, 1, 5);
    until(
        ms(3000),
        "the new stream reads from the committed position",
        || fresh[1].received() == [3, 4],
    )
    .await;
    fake.wait_for(ms(3000), |s| {
        s.iter()
            .any(|c| c.api == ApiKey::OffsetCommit && c.ok() && c.commits(TOPIC, 1, 5))
    })
    .await
    .expect("the new stream's completions committed");
    close(c, &fake).await;
    for w in workers.into_iter().chain(fresh) {
        w.task.abort();
    }
}

/// A lost generation (ILLEGAL_GENERATION on a heartbeat): every stream is revoked and nothing
/// is committed, even what completed while the streams stopped; then the member rejoins.
#[tokio::test]
async fn lost_generation_revokes_everything_without_commit_then_rejoins() {
    let fake = FakeBroker::start(&[(TOPIC, 2)]).await;
    fake.protocol("cooperative-sticky");
    fake.assign(&tps(&[0, 1]));
    for p in 0..2 {
        fake.log_end(TOPIC, p, 3);
    }
    let mut c = start(&fake, Duration::from_secs(30)).await;
    let acker = c.acker();
    let workers = spawn_all(next_streams(&mut c, 2, ms(5000)).await, &acker, |_| true);
    until(ms(3000), "both received their records", || {
        workers.iter().all(|w| w.received() == [0, 1, 2])
    })
    .await;

    let lost_at = Instant::now();
    fake.heartbeat_error(ResponseError::IllegalGeneration);
    until(ms(3000), "every stream revoked", || {
        workers.iter().all(Worker::revoked)
    })
    .await;
    let fresh = next_streams(&mut c, 2, ms(5000)).await;
    let joins = fake.joins();
    assert_eq!(joins.len(), 2, "{joins:#?}");
    assert!(joins[1].at > lost_at);
    let before: Vec<Seen> = fake
        .commits()
        .into_iter()
        .filter(|c| c.at < joins[1].at)
        .collect();
    assert!(
        !before.iter().any(|c| c.at > lost_at),
        "no OffsetCommit between the loss and the rejoin: {before:#?}"
    );
    // (The reset position may have been committed before; never the completed records.)
    assert!(
        before.iter().all(|c| c.offsets.iter().all(|o| o.2 == 0)),
        "{before:#?}"
    );
    assert_eq!(fake.committed(TOPIC, 0).unwrap_or(0), 0);
    assert_eq!(fake.committed(TOPIC, 1).unwrap_or(0), 0);
    let old_epoch = workers.iter().map(|w| w.epoch).max().unwrap();
    for s in &fresh {
        assert!(s.epoch > old_epoch);
        assert_eq!(*s.committed().borrow(), 0, "redone from the start");
    }
    // The old generation's completions (acked while draining) never count.
    let fresh = spawn_all(fresh, &acker, |_| false);
    until(ms(3000), "the new owner redoes the records", || {
        fresh.iter().all(|w| w.received() == [0, 1, 2])
    })
    .await;
    close(c, &fake).await;
    for w in workers.into_iter().chain(fresh) {
        w.task.abort();
    }
}

/// More partitions (Metadata says 4 instead of 2): the member rejoins within the metadata
/// refresh interval plus slack; with the cooperative protocol, 0 and 1 keep running and the
/// new partitions are handed out.
#[tokio::test]
async fn partition_count_growth_makes_the_member_rejoin() {
    let fake = FakeBroker::start(&[(TOPIC, 2)]).await;
    fake.protocol("cooperative-sticky");
    fake.assign(&tps(&[0, 1]));
    let mut c = start(&fake, ms(300)).await;
    let acker = c.acker();
    let workers = spawn_all(next_streams(&mut c, 2, ms(5000)).await, &acker, |_| false);
    // A few refreshes with the same count: no rejoin.
    tokio::time::sleep(ms(800)).await;
    assert_eq!(
        fake.joins().len(),
        1,
        "no rejoin while the count is the same"
    );

    fake.assign(&tps(&[0, 1, 2, 3]));
    let grown_at = Instant::now();
    fake.set_partitions(TOPIC, 4);
    let seen = fake
        .wait_for(ms(2000), |s| {
            s.iter()
                .filter(|r| r.api == ApiKey::JoinGroup && r.ok())
                .count()
                >= 2
        })
        .await
        .expect("a rejoin after the partition count grew");
    let join = seen
        .iter()
        .filter(|r| r.api == ApiKey::JoinGroup && r.ok())
        .nth(1)
        .unwrap();
    assert!(
        join.at - grown_at < ms(300 + 500),
        "rejoined {:?} after the count grew",
        join.at - grown_at
    );
    let fresh = next_streams(&mut c, 2, ms(3000)).await;
    assert_eq!(
        fresh.iter().map(|s| s.partition).collect::<BTreeSet<_>>(),
        BTreeSet::from([2, 3])
    );
    for w in &workers {
        assert_eq!(
            w.states(),
            [StreamState::Active],
            "partition {}",
            w.partition
        );
    }
    close(c, &fake).await;
    for w in workers {
        w.task.abort();
    }
}

/// Cooperative, after a stable session longer than the session timeout: a rebalance whose
/// first JoinGroup fails once (COORDINATOR_NOT_AVAILABLE, retryable) while heartbeats are
/// answered must not cost the partitions: they keep running and the retry rejoins.
/// (The join-failure path once judged the session by the time of the last successful join, so
/// after any long stable period everything was revoked without commit; it now asks when the
/// coordinator last answered anything.)
#[tokio::test]
async fn cooperative_failed_rejoin_after_a_long_stable_session_keeps_partitions() {
    let fake = FakeBroker::start(&[(TOPIC, 2)]).await;
    fake.protocol("cooperative-sticky");
    fake.assign(&tps(&[0, 1]));
    for p in 0..2 {
        fake.log_end(TOPIC, p, 3);
    }
    let mut c = start(&fake, Duration::from_secs(30)).await;
    let acker = c.acker();
    let workers = spawn_all(next_streams(&mut c, 2, ms(5000)).await, &acker, |_| false);
    // Longer than the session timeout, heartbeats answered all along.
    tokio::time::sleep(ms(2000)).await;
    assert!(c.is_connected());
    fake.fail_next_joins(&[ResponseError::CoordinatorNotAvailable]);
    fake.rebalance(&tps(&[0, 1]));
    fake.wait_for(ms(3000), |s| {
        s.iter()
            .filter(|r| r.api == ApiKey::JoinGroup && r.ok())
            .count()
            >= 2
    })
    .await
    .expect("rejoined after the failed JoinGroup");
    tokio::time::sleep(ms(200)).await;
    for w in &workers {
        assert_eq!(
            w.states(),
            [StreamState::Active],
            "partition {} kept through a retried rejoin",
            w.partition
        );
    }
    close(c, &fake).await;
    for w in workers {
        w.task.abort();
    }
}

/// The committed positions of `p` the broker took, in the order it took them.
fn committed_sequence(fake: &FakeBroker, p: i32) -> Vec<i64> {
    fake.commits()
        .iter()
        .filter(|c| c.ok())
        .flat_map(|c| c.offsets.iter())
        .filter(|(t, q, _)| t == TOPIC && *q == p)
        .map(|(.., o)| *o)
        .collect()
}

/// Close while a commit is slow at the broker (answered after more than the 1 s sweep): the
/// revoke's commit is asked for after the drain timeout, the held records complete just after,
/// and when the slow answer comes the due sweep commits their higher position first. The
/// revoke's commit, served next, must not move the broker's committed offset back (its
/// position was read before the late completions).
#[tokio::test]
async fn revoke_commit_never_moves_the_committed_offset_back() {
    let fake = FakeBroker::start(&[(TOPIC, 1)]).await;
    fake.assign(&tps(&[0]));
    fake.log_end(TOPIC, 0, 3);
    let mut cfg = config(Duration::from_secs(30));
    // Call timeout 2 s: a commit answered after 1.5 s is not a timeout.
    cfg.group.session_timeout = ms(6000);
    cfg.drain_timeout = ms(200);
    let cluster = tokio::time::timeout(ms(5000), fake.cluster())
        .await
        .expect("Cluster::connect within 5 s");
    let mut c = Consumer::start(cluster, cfg, None);
    let acker = c.acker();
    let mut s = next_streams(&mut c, 1, ms(5000)).await.remove(0);
    let b = tokio::time::timeout(ms(3000), s.recv())
        .await
        .expect("a batch within 3 s")
        .expect("a batch");
    let offsets: Vec<i64> = b.records.iter().map(|r| r.offset).collect();
    assert_eq!(offsets, [0, 1, 2]);
    fake.wait_for(ms(3000), |s| {
        s.iter()
            .any(|c| c.api == ApiKey::OffsetCommit && c.ok() && c.commits(TOPIC, 0, 0))
    })
    .await
    .expect("the start position committed");

    // A commit of 1, answered 1.5 s after the broker applied it: meanwhile the session task
    // waits, and its 1 s sweep comes due.
    fake.commit_delay(ms(1500));
    acker.complete(&b.token(0));
    fake.wait_for(ms(3000), |s| {
        s.iter()
            .any(|c| c.api == ApiKey::OffsetCommit && c.commits(TOPIC, 0, 1))
    })
    .await
    .expect("the commit of 1 read by the broker");
    c.begin_close();
    let mut state = s.state();
    tokio::time::timeout(ms(1000), state.wait_for(|s| *s == StreamState::Draining))
        .await
        .expect("draining within 1 s")
        .expect("the state watch");
    // Past the drain timeout (the revoke's commit is asked for), before the slow answer.
    tokio::time::sleep(ms(450)).await;
    acker.complete(&b.token(1));
    acker.complete(&b.token(2));
    fake.wait_for(ms(3000), |s| {
        s.iter()
            .any(|c| c.api == ApiKey::OffsetCommit && c.ok() && c.commits(TOPIC, 0, 3))
    })
    .await
    .expect("the late completions committed");
    fake.commit_delay(Duration::ZERO);
    tokio::time::timeout(ms(5000), c.closed())
        .await
        .expect("closed within 5 s");

    let seq = committed_sequence(&fake, 0);
    assert!(
        seq.windows(2).all(|w| w[0] <= w[1]),
        "the broker's committed offset moved back: {seq:?}"
    );
    assert_eq!(fake.committed(TOPIC, 0), Some(3), "{seq:?}");
    assert!(!fake.of(ApiKey::LeaveGroup).is_empty(), "LeaveGroup sent");
}

/// SIGTERM while a cooperative rejoin waits in JoinGroup (the other members are slow): the
/// member still owns its partitions and they still run, so close must drain them (their held
/// records complete), commit what completed and leave the group, as a close outside a rebalance
/// does.
#[tokio::test]
async fn close_during_a_cooperative_rejoin_drains_commits_and_leaves() {
    let fake = FakeBroker::start(&[(TOPIC, 2)]).await;
    fake.protocol("cooperative-sticky");
    fake.assign(&tps(&[0, 1]));
    for p in 0..2 {
        fake.log_end(TOPIC, p, 3);
    }
    let mut c = start(&fake, Duration::from_secs(30)).await;
    let acker = c.acker();
    let workers = spawn_all(next_streams(&mut c, 2, ms(5000)).await, &acker, |_| true);
    until(ms(3000), "both received their records", || {
        workers.iter().all(|w| w.received() == [0, 1, 2])
    })
    .await;

    fake.hold_joins(true);
    fake.rebalance(&tps(&[0, 1]));
    until(ms(3000), "the rejoin's JoinGroup held", || {
        fake.joins_held() == 1
    })
    .await;
    for w in &workers {
        assert_eq!(
            w.states(),
            [StreamState::Active],
            "partition {}",
            w.partition
        );
    }
    tokio::time::timeout(ms(5000), c.close())
        .await
        .expect("close within 5 s");

    for w in &workers {
        assert_eq!(
            w.states(),
            [
                StreamState::Active,
                StreamState::Draining,
                StreamState::Revoked
            ],
            "partition {} drained before it was revoked",
            w.partition
        );
        assert_eq!(
            fake.committed(TOPIC, w.partition),
            Some(3),
            "partition {}: the records completed in the drain are committed",
            w.partition
        );
    }
    let leaves = fake.of(ApiKey::LeaveGroup);
    assert_eq!(leaves.len(), 1, "one LeaveGroup: {leaves:#?}");
    assert_eq!(leaves[0].member_id.as_deref(), Some(fake_broker::MEMBER));
    assert_eq!(
        fake.joins().len(),
        1,
        "the held JoinGroup was never answered"
    );
    for w in workers {
        w.task.abort();
    }
}

async fn fatal_join(e: ResponseError) -> String {
    let fake = FakeBroker::start(&[(TOPIC, 2)]).await;
    fake.assign(&tps(&[0, 1]));
    fake.join_error(Some(e));
    let mut c = start(&fake, Duration::from_secs(30)).await;
    let r = tokio::time::timeout(ms(5000), c.next_stream())
        .await
        .expect("next_stream ends within 5 s");
    assert!(r.is_none(), "no stream after a fatal join error");
    let why = c.fatal_error().expect("fatal_error set");
    assert_eq!(
        fake.of(ApiKey::JoinGroup).len(),
        1,
        "no retry after a fatal error"
    );
    assert!(fake.of(ApiKey::Heartbeat).is_empty());
    why
}

/// FENCED_INSTANCE_ID on JoinGroup: the consumer stops for good and says why.
#[tokio::test]
async fn fenced_instance_on_join_is_fatal() {
    let why = fatal_join(ResponseError::FencedInstanceId).await;
    assert!(why.contains("FENCED_INSTANCE_ID"), "{why}");
}

/// GROUP_AUTHORIZATION_FAILED on JoinGroup: the same.
#[tokio::test]
async fn group_authorization_failure_on_join_is_fatal() {
    let why = fatal_join(ResponseError::GroupAuthorizationFailed).await;
    assert!(why.contains("not authorized to join the group"), "{why}");
}
