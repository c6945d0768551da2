//! The session task's timing against a fake coordinator (tests/fake_coordinator): heartbeats at
//! the interval with the current identity, a silent coordinator loses the session in time,
//! REBALANCE_IN_PROGRESS told once per generation, a fenced generation (ILLEGAL_GENERATION,
//! UNKNOWN_MEMBER_ID) makes no more calls until the next identity, FENCED_INSTANCE_ID is fatal,
//! commits follow completions one at a time, and an empty commit is no answer from the
//! coordinator.
//!
//! Real time, short durations: session timeout 1.5 s, heartbeat interval 300 ms (so the call
//! timeout is 500 ms). Every wait is bounded.

mod fake_coordinator;

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use fake_coordinator::{FakeCoordinator, Reply, Seen};
use kafka_io::{
    GroupConfig,
    assignor::Tp,
    session::{self, CommitRequest, Identity, Positions, Session, SessionEvent},
};
use kafka_protocol::{error::ResponseError, messages::ApiKey};
use tokio::{
    sync::{Notify, mpsc, oneshot},
    time::Instant,
};

const SESSION: Duration = Duration::from_millis(1500);
const HEARTBEAT: Duration = Duration::from_millis(300);
/// Scheduling noise allowed on top of any expected time (2 shared cores).
const SLACK: Duration = Duration::from_millis(200);

fn call() -> Duration {
    session::call_timeout(SESSION)
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn tp(t: &str, p: i32) -> Tp {
    (t.to_owned(), p)
}

fn id(member: &str, generation: i32) -> Identity {
    Identity {
        member_id: member.to_owned(),
        generation,
    }
}

/// A fake offsets table: what completed and is not committed yet, what was committed, and
/// every readiness change.
#[derive(Default)]
struct Table {
    state: Mutex<TableState>,
    completed: Notify,
}

#[derive(Default)]
struct TableState {
    pending: BTreeMap<Tp, i64>,
    committed: Vec<Vec<(Tp, i64)>>,
    group_ok: Vec<(Instant, bool)>,
}

impl Table {
    fn lock(&self) -> std::sync::MutexGuard<'_, TableState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A record completed: `position` is now committable.
    fn complete(&self, tp: Tp, position: i64) {
        self.lock().pending.insert(tp, position);
        self.completed.notify_one();
    }

    /// `position` is committable, and no completion tells the session (for explicit commits).
    fn set(&self, tp: Tp, position: i64) {
        self.lock().pending.insert(tp, position);
    }

    /// A completion notice with nothing new to commit.
    fn poke(&self) {
        self.completed.notify_one();
    }

    fn group_ok(&self) -> Vec<(Instant, bool)> {
        self.lock().group_ok.clone()
    }

    fn committed(&self) -> Vec<Vec<(Tp, i64)>> {
        self.lock().committed.clone()
    }
}

impl Positions for Table {
    fn to_commit(&self, only: Option<&[Tp]>) -> Vec<(Tp, i64)> {
        self.lock()
            .pending
            .iter()
            .filter(|(t, _)| only.is_none_or(|o| o.contains(t)))
            .map(|(t, o)| (t.clone(), *o))
            .collect()
    }
    fn committed(&self, done: &[(Tp, i64)]) {
        let mut st = self.lock();
        for (t, o) in done {
            if st.pending.get(t) == Some(o) {
                st.pending.remove(t);
            }
        }
        st.committed.push(done.to_vec());
    }
    fn completed(&self) -> impl Future<Output = ()> + Send {
        self.completed.notified()
    }
    fn set_group_ok(&self, ok: bool) {
        self.lock().group_ok.push((Instant::now(), ok));
    }
}

struct Rig {
    fake: FakeCoordinator,
    table: Arc<Table>,
    session: Session,
}

impl Drop for Rig {
    fn drop(&mut self) {
        self.session.task.abort();
    }
}

async fn rig(commit_interval: Duration) -> Rig {
    rig_with(commit_interval, HEARTBEAT).await
}

async fn rig_with(commit_interval: Duration, heartbeat: Duration) -> Rig {
    let fake = FakeCoordinator::start().await;
    let mut group = GroupConfig::new("g", vec!["in".into()]);
    group.session_timeout = SESSION;
    group.heartbeat_interval = heartbeat;
    let table = Arc::new(Table::default());
    let session = session::start(fake.connector(), group, commit_interval, table.clone());
    Rig {
        fake,
        table,
        session,
    }
}

/// The next session event within `within`, with the time it was received.
async fn next_event(
    events: &mut mpsc::UnboundedReceiver<(i32, SessionEvent)>,
    within: Duration,
) -> Option<(Instant, i32, SessionEvent)> {
    let (g, ev) = tokio::time::timeout(within, events.recv()).await.ok()??;
    Some((Instant::now(), g, ev))
}

/// The events received so far.
fn drain(events: &mut mpsc::UnboundedReceiver<(i32, SessionEvent)>) -> Vec<(i32, SessionEvent)> {
    std::iter::from_fn(|| events.try_recv().ok()).collect()
}

/// An explicit commit of `partitions` through the session; None when it did not answer within
/// 3 s.
async fn commit(
    commits: &mpsc::Sender<CommitRequest>,
    partitions: Vec<Tp>,
) -> Option<kafka_io::Result<()>> {
    let (done, rx) = oneshot::channel();
    commits
        .send(CommitRequest { partitions, done })
        .await
        .ok()?;
    tokio::time::timeout(Duration::from_secs(3), rx)
        .await
        .ok()?
        .ok()
}

fn after(seen: &[Seen], t: Instant) -> Vec<&Seen> {
    seen.iter().filter(|s| s.at > t).collect()
}

fn answered_heartbeats(seen: &[Seen]) -> usize {
    seen.iter()
        .filter(|s| s.api == ApiKey::Heartbeat && s.answered.is_some())
        .count()
}

fn offsets(v: &[(&str, i32, i64)]) -> Vec<(String, i32, i64)> {
    v.iter().map(|(t, p, o)| (t.to_string(), *p, *o)).collect()
}

#[tokio::test]
async fn heartbeats_at_the_interval_with_the_current_identity() {
    let rig = rig(ms(50)).await;

    // Not a member (generation -1): nothing is sent, not even a connection is made; a
    // completion waits for the join, an explicit commit fails.
    rig.table.complete(tp("in", 0), 3);
    let r = commit(&rig.session.commits, vec![tp("in", 0)])
        .await
        .expect("the explicit commit is answered");
    assert!(r.is_err(), "{r:?}");
    tokio::time::sleep(HEARTBEAT + ms(100)).await;
    assert!(rig.fake.requests().is_empty(), "{:?}", rig.fake.requests());
    assert_eq!(rig.fake.connections(), 0);

    let joined = Instant::now();
    rig.session.identity.send_replace(id("m-1", 4));
    // Heartbeats at once and every 300 ms: 0, .3, .6, .9, 1.2 s.
    tokio::time::sleep(HEARTBEAT * 4 + ms(150)).await;
    let hb = rig.fake.heartbeats();
    assert!(
        (4..=5).contains(&hb.len()),
        "{} heartbeats: {hb:?}",
        hb.len()
    );
    for h in &hb {
        assert_eq!(h.generation, Some(4), "{h:?}");
        assert_eq!(h.member_id.as_deref(), Some("m-1"), "{h:?}");
        assert!(h.answered.is_some(), "{h:?}");
    }
    let first = hb[0].at - joined;
    assert!(first < SLACK, "first heartbeat {first:?} after the join");
    for w in hb.windows(2) {
        let gap = w[1].at - w[0].at;
        assert!(
            gap >= HEARTBEAT - ms(60) && gap <= HEARTBEAT + SLACK,
            "heartbeat gap {gap:?}, interval {HEARTBEAT:?}"
        );
    }
    // The completion from before the join is committed with its identity, and every call
    // shares one connection (the one FindCoordinator answered).
    let c = rig.fake.commits();
    assert!(
        matches!(&c[..], [c] if c.generation == Some(4) && c.offsets == offsets(&[("in", 0, 3)])),
        "{c:?}"
    );
    assert_eq!(rig.fake.connections(), 1);

    // Out of the group again: no more heartbeats.
    rig.session.identity.send_replace(id("m-1", -1));
    let left = Instant::now();
    tokio::time::sleep(HEARTBEAT * 2).await;
    let late = rig.fake.requests();
    let late = after(&late, left + ms(50));
    assert!(late.is_empty(), "calls with generation -1: {late:?}");

    // A new identity: heartbeats resume at once with it.
    let rejoined = Instant::now();
    rig.session.identity.send_replace(id("m-2", 5));
    tokio::time::sleep(HEARTBEAT + ms(100)).await;
    let hb = rig.fake.heartbeats();
    let hb = after(&hb, rejoined);
    assert!(!hb.is_empty());
    assert!(hb[0].at - rejoined < SLACK, "{:?}", hb[0].at - rejoined);
    for h in hb {
        assert_eq!(
            (h.generation, h.member_id.as_deref()),
            (Some(5), Some("m-2"))
        );
    }
}

#[tokio::test]
async fn silent_coordinator_loses_the_session_in_time() {
    let mut rig = rig(ms(50)).await;
    rig.session.identity.send_replace(id("m", 1));
    rig.fake
        .wait_for(HEARTBEAT * 3 + SLACK, |s| answered_heartbeats(s) >= 2)
        .await
        .expect("two heartbeats answered");

    rig.fake.blackhole(true);
    let silent_from = Instant::now();
    let (lost_at, generation, ev) =
        next_event(&mut rig.session.events, SESSION + call() * 2 + SLACK * 2)
            .await
            .expect("a Lost event");
    assert_eq!(generation, 1);
    assert!(
        matches!(
            ev,
            SessionEvent::Lost {
                unknown_member: false
            }
        ),
        "{ev:?}"
    );

    let seen = rig.fake.requests();
    let last_answer = seen.iter().filter_map(|s| s.answered).max().unwrap();
    assert!(last_answer <= silent_from + ms(20));
    let quiet = lost_at - last_answer;
    assert!(
        quiet >= SESSION,
        "lost after {quiet:?} without an answer: before the session timeout {SESSION:?}"
    );
    assert!(
        quiet <= SESSION + call() + SLACK,
        "lost only after {quiet:?} without an answer (session {SESSION:?} + call {:?})",
        call()
    );

    // Readiness turned off when the first heartbeat timed out, and stayed off.
    let first_unanswered = seen
        .iter()
        .find(|s| s.api == ApiKey::Heartbeat && s.reply == Reply::Silent)
        .expect("a heartbeat to the silent coordinator");
    let oks = rig.table.group_ok();
    let (off_at, _) = *oks.iter().find(|(_, ok)| !ok).expect("set_group_ok(false)");
    let timed_out = first_unanswered.at + call();
    assert!(
        off_at + ms(30) >= timed_out && off_at <= timed_out + SLACK,
        "readiness off at {:?}, the first heartbeat timed out at {:?} (after the silence began)",
        off_at - silent_from,
        timed_out - silent_from
    );
    assert!(off_at < lost_at);
    let back_on: Vec<_> = oks.iter().filter(|(t, ok)| *ok && *t > off_at).collect();
    assert!(back_on.is_empty(), "readiness on again: {back_on:?}");

    // The lost generation makes no more calls.
    tokio::time::sleep(HEARTBEAT * 2).await;
    let seen = rig.fake.requests();
    let late = after(&seen, lost_at + ms(50));
    assert!(late.is_empty(), "calls after the loss: {late:?}");
}

#[tokio::test]
async fn rebalance_is_told_once_per_generation_while_heartbeats_go_on() {
    let mut rig = rig(ms(50)).await;
    rig.fake
        .heartbeat(Reply::Error(ResponseError::RebalanceInProgress));
    rig.session.identity.send_replace(id("m", 3));
    tokio::time::sleep(HEARTBEAT * 4 + ms(150)).await;
    let events = drain(&mut rig.session.events);
    assert!(
        matches!(events[..], [(3, SessionEvent::Rebalance)]),
        "{events:?}"
    );
    let hb = rig.fake.heartbeats();
    assert!(hb.len() >= 4, "{hb:?}");
    for h in &hb {
        assert_eq!(h.generation, Some(3));
        assert_eq!(h.reply, Reply::Error(ResponseError::RebalanceInProgress));
        assert!(h.answered.is_some());
    }

    // While it rejoins (another generation, still rebalancing) for longer than a session: the
    // answered heartbeats keep the member in the group; one Rebalance for the new generation.
    let rejoined = Instant::now();
    rig.session.identity.send_replace(id("m", 4));
    tokio::time::sleep(SESSION + SLACK).await;
    let events = drain(&mut rig.session.events);
    assert!(
        matches!(events[..], [(4, SessionEvent::Rebalance)]),
        "{events:?}"
    );
    let hb = rig.fake.heartbeats();
    let hb4 = after(&hb, rejoined);
    assert!(hb4.len() >= 5, "{hb4:?}");
    assert!(hb4.iter().all(|h| h.generation == Some(4)), "{hb4:?}");
    let oks = rig.table.group_ok();
    assert!(oks.iter().all(|(_, ok)| *ok), "readiness went off: {oks:?}");

    // The rebalance ends: no more news.
    rig.fake.heartbeat(Reply::Answer);
    tokio::time::sleep(HEARTBEAT + ms(100)).await;
    let events = drain(&mut rig.session.events);
    assert!(events.is_empty(), "{events:?}");
}

#[tokio::test]
async fn illegal_generation_stops_calls_until_a_new_identity() {
    let mut rig = rig(ms(50)).await;
    rig.session.identity.send_replace(id("m-1", 7));
    rig.fake
        .wait_for(HEARTBEAT + SLACK, |s| answered_heartbeats(s) >= 1)
        .await
        .expect("a heartbeat answered");

    rig.fake
        .heartbeat(Reply::Error(ResponseError::IllegalGeneration));
    let (lost_at, generation, ev) = next_event(&mut rig.session.events, HEARTBEAT + SLACK * 2)
        .await
        .expect("a Lost event");
    assert_eq!(generation, 7);
    assert!(
        matches!(
            ev,
            SessionEvent::Lost {
                unknown_member: false
            }
        ),
        "{ev:?}"
    );
    // The coordinator would answer now, but the generation is gone: a completion and an
    // explicit commit send nothing, and no heartbeat goes out (past the 1 s sweep too).
    rig.fake.heartbeat(Reply::Answer);
    rig.table.complete(tp("in", 0), 5);
    let r = commit(&rig.session.commits, vec![tp("in", 1)])
        .await
        .expect("the explicit commit is answered");
    assert!(r.is_err(), "a commit with a fenced generation: {r:?}");
    tokio::time::sleep(ms(1100)).await;
    let seen = rig.fake.requests();
    let late = after(&seen, lost_at + ms(50));
    assert!(
        late.is_empty(),
        "calls with the fenced generation: {late:?}"
    );
    let events = drain(&mut rig.session.events);
    assert!(events.is_empty(), "{events:?}");

    // A new join: heartbeats resume with its generation, and the pending position is committed.
    let rejoined = Instant::now();
    rig.session.identity.send_replace(id("m-1", 8));
    let seen = rig
        .fake
        .wait_for(HEARTBEAT + SLACK, |s| {
            after(s, rejoined)
                .iter()
                .any(|s| s.api == ApiKey::OffsetCommit)
                && after(s, rejoined)
                    .iter()
                    .any(|s| s.api == ApiKey::Heartbeat)
        })
        .await
        .expect("a heartbeat and a commit after the new identity");
    for s in after(&seen, rejoined) {
        assert_eq!(
            (s.generation, s.member_id.as_deref()),
            (Some(8), Some("m-1")),
            "{s:?}"
        );
        if s.api == ApiKey::OffsetCommit {
            assert_eq!(s.offsets, offsets(&[("in", 0, 5)]));
        }
    }

    // Fenced again; the next join has the same generation number (a restarted coordinator)
    // and a new member id: that is a new identity, and calls resume with it.
    rig.fake
        .heartbeat(Reply::Error(ResponseError::IllegalGeneration));
    let (lost_at, generation, ev) = next_event(&mut rig.session.events, HEARTBEAT + SLACK * 2)
        .await
        .expect("a second Lost event");
    assert_eq!(generation, 8);
    assert!(matches!(ev, SessionEvent::Lost { .. }), "{ev:?}");
    rig.fake.heartbeat(Reply::Answer);
    tokio::time::sleep(HEARTBEAT * 2).await;
    let seen = rig.fake.requests();
    let late = after(&seen, lost_at + ms(50));
    assert!(
        late.is_empty(),
        "calls with the fenced generation: {late:?}"
    );

    let rejoined = Instant::now();
    rig.session.identity.send_replace(id("m-2", 8));
    let seen = rig
        .fake
        .wait_for(HEARTBEAT * 2 + SLACK, |s| {
            after(s, rejoined)
                .iter()
                .filter(|s| s.api == ApiKey::Heartbeat && s.answered.is_some())
                .count()
                >= 2
        })
        .await
        .expect("heartbeats after the same generation number came back");
    for s in after(&seen, rejoined) {
        assert_eq!(
            (s.generation, s.member_id.as_deref()),
            (Some(8), Some("m-2")),
            "{s:?}"
        );
    }
    let events = drain(&mut rig.session.events);
    assert!(events.is_empty(), "{events:?}");
}

#[tokio::test]
async fn unknown_member_is_lost_and_stops_calls() {
    let mut rig = rig(ms(50)).await;
    rig.fake
        .heartbeat(Reply::Error(ResponseError::UnknownMemberId));
    rig.session.identity.send_replace(id("m", 2));
    let (lost_at, generation, ev) = next_event(&mut rig.session.events, SLACK * 2)
        .await
        .expect("a Lost event");
    assert_eq!(generation, 2);
    assert!(
        matches!(
            ev,
            SessionEvent::Lost {
                unknown_member: true
            }
        ),
        "{ev:?}"
    );
    rig.table.complete(tp("in", 0), 1);
    tokio::time::sleep(HEARTBEAT * 3).await;
    let seen = rig.fake.requests();
    let late = after(&seen, lost_at + ms(50));
    assert!(late.is_empty(), "calls after UNKNOWN_MEMBER_ID: {late:?}");
    let events = drain(&mut rig.session.events);
    assert!(events.is_empty(), "{events:?}");
}

#[tokio::test]
async fn fenced_instance_id_is_fatal() {
    let mut rig = rig(ms(50)).await;
    rig.fake
        .heartbeat(Reply::Error(ResponseError::FencedInstanceId));
    rig.session.identity.send_replace(id("m", 2));
    let (fatal_at, generation, ev) = next_event(&mut rig.session.events, SLACK * 2)
        .await
        .expect("a Fatal event");
    assert_eq!(generation, 2);
    let SessionEvent::Fatal(why) = ev else {
        panic!("{ev:?}")
    };
    assert!(why.contains("FENCED_INSTANCE_ID"), "{why}");

    // Nothing more is said with that generation, and no other news.
    tokio::time::sleep(HEARTBEAT * 3).await;
    let seen = rig.fake.requests();
    let late = after(&seen, fatal_at + ms(50));
    assert!(late.is_empty(), "calls after the fatal error: {late:?}");
    let events = drain(&mut rig.session.events);
    assert!(events.is_empty(), "{events:?}");
}

#[tokio::test]
async fn commits_follow_completions_one_at_a_time() {
    let interval = ms(200);
    let rig = rig(interval).await;
    rig.session.identity.send_replace(id("m", 1));
    rig.fake
        .wait_for(HEARTBEAT + SLACK, |s| answered_heartbeats(s) >= 1)
        .await
        .expect("a heartbeat answered");

    // A completion: committed within the commit interval.
    let t1 = Instant::now();
    rig.table.complete(tp("in", 0), 10);
    let seen = rig
        .fake
        .wait_for(interval + SLACK, |s| {
            s.iter()
                .any(|s| s.api == ApiKey::OffsetCommit && s.answered.is_some())
        })
        .await
        .expect("a commit after the completion");
    let c1 = seen
        .iter()
        .find(|s| s.api == ApiKey::OffsetCommit)
        .unwrap()
        .clone();
    // (The session paces commits from its start: at most one interval.)
    assert!(c1.at - t1 <= interval + SLACK / 2, "{:?}", c1.at - t1);
    assert_eq!(c1.offsets, offsets(&[("in", 0, 10)]));
    assert_eq!(
        (c1.generation, c1.member_id.as_deref()),
        (Some(1), Some("m"))
    );

    // The next completion right after: committed one interval after the last commit.
    let t2 = Instant::now();
    rig.table.complete(tp("in", 0), 20);
    let seen = rig
        .fake
        .wait_for(interval + SLACK, |s| {
            s.iter().filter(|s| s.api == ApiKey::OffsetCommit).count() >= 2
        })
        .await
        .expect("a second commit");
    let c2 = seen
        .iter()
        .filter(|s| s.api == ApiKey::OffsetCommit)
        .nth(1)
        .unwrap()
        .clone();
    assert_eq!(c2.offsets, offsets(&[("in", 0, 20)]));
    let since_c1 = c2.at - c1.at;
    assert!(
        since_c1 + ms(20) >= interval,
        "two commits {since_c1:?} apart, interval {interval:?}"
    );
    assert!(c2.at - t2 <= interval + SLACK / 2, "{:?}", c2.at - t2);
    // Recorded as committed once answered.
    tokio::time::sleep(ms(20)).await;
    assert_eq!(
        rig.table.committed(),
        vec![vec![(tp("in", 0), 10)], vec![(tp("in", 0), 20)]]
    );

    // An explicit commit is answered Ok and commits its partition's position.
    rig.table.set(tp("in", 1), 42);
    let r = commit(&rig.session.commits, vec![tp("in", 1)])
        .await
        .expect("the explicit commit is answered");
    assert!(r.is_ok(), "{r:?}");
    let c3 = rig.fake.commits().pop().unwrap();
    assert_eq!(c3.offsets, offsets(&[("in", 1, 42)]));
    assert!(c3.answered.is_some());

    // Under load (slow answers, completions every 20 ms, explicit commits in between): the
    // coordinator never has two commits at once, and the last position gets committed.
    rig.fake.commit_delay(ms(120));
    let start = rig.fake.commits().len();
    let mut explicit = Vec::new();
    for i in 0..30i64 {
        rig.table.complete(tp("in", 0), 100 + i);
        if i % 6 == 0 {
            rig.table.set(tp("in", 2), i);
            let commits = rig.session.commits.clone();
            explicit.push(tokio::spawn(async move {
                commit(&commits, vec![tp("in", 2)]).await
            }));
        }
        tokio::time::sleep(ms(20)).await;
    }
    for e in explicit {
        let r = e.await.unwrap().expect("the explicit commit is answered");
        assert!(r.is_ok(), "{r:?}");
    }
    let seen = rig
        .fake
        .wait_for(Duration::from_secs(2), |s| {
            s.iter().any(|s| {
                s.api == ApiKey::OffsetCommit
                    && s.answered.is_some()
                    && s.offsets.contains(&("in".into(), 0, 129))
            })
        })
        .await
        .expect("the last position committed");
    let loaded: Vec<&Seen> = seen
        .iter()
        .filter(|s| s.api == ApiKey::OffsetCommit)
        .skip(start)
        .collect();
    assert!(loaded.len() >= 6, "{} commits under load", loaded.len());
    assert_eq!(rig.fake.max_commits_in_flight(), 1);
    // Each partition's committed position only moves forward.
    let mut last: BTreeMap<(String, i32), i64> = BTreeMap::new();
    for c in &loaded {
        for (t, p, o) in &c.offsets {
            let prev = last.insert((t.clone(), *p), *o);
            assert!(
                prev.is_none_or(|prev| prev <= *o),
                "{t}/{p}: {prev:?} then {o}"
            );
        }
    }
}

#[tokio::test]
async fn empty_commits_send_nothing_and_are_no_answer() {
    // A heartbeat interval above the call timeout: between two timed-out heartbeats the
    // session has time for commits (with 300 ms, a timed-out heartbeat is followed at once by
    // the next one, and nothing else runs until the loss).
    let heartbeat = call() + ms(200);
    let mut rig = rig_with(ms(50), heartbeat).await;
    rig.session.identity.send_replace(id("m", 1));
    rig.fake
        .wait_for(SLACK, |s| answered_heartbeats(s) >= 1)
        .await
        .expect("a heartbeat answered");

    // Silent coordinator; meanwhile completions with nothing new and empty explicit commits.
    rig.fake.blackhole(true);
    let silent_from = Instant::now();
    let deadline = silent_from + SESSION + call() * 2 + SLACK * 2;
    let (events, commits, table) = (&mut rig.session.events, &rig.session.commits, &rig.table);
    let mut empty_ok = Vec::new();
    let (lost_at, generation, ev) = loop {
        assert!(
            Instant::now() < deadline,
            "no Lost from a silent coordinator"
        );
        tokio::select! {
            e = events.recv() => {
                let (g, ev) = e.expect("the session task runs");
                break (Instant::now(), g, ev);
            }
            r = async {
                table.poke();
                let r = commit(commits, Vec::new()).await;
                let at = Instant::now();
                tokio::time::sleep(ms(50)).await;
                (at, r)
            } => {
                let (at, r) = r;
                let r = r.expect("the empty commit is answered");
                assert!(r.is_ok(), "{r:?}");
                empty_ok.push(at);
            }
        }
    };
    assert_eq!(generation, 1);
    assert!(matches!(ev, SessionEvent::Lost { .. }), "{ev:?}");

    let seen = rig.fake.requests();
    let first_silent = seen
        .iter()
        .find(|s| s.reply == Reply::Silent)
        .expect("a call to the silent coordinator")
        .at;
    // Empty commits were answered before and between the timed-out heartbeats.
    let before = empty_ok.iter().filter(|t| **t < first_silent).count();
    let between = empty_ok
        .iter()
        .filter(|t| **t > first_silent + call())
        .count();
    assert!(before >= 3 && between >= 1, "{empty_ok:?}");
    // Nothing was sent for them, and they did not count as answers: the session was lost in
    // time, and readiness never turned on again.
    let commits: Vec<_> = seen
        .iter()
        .filter(|s| s.api == ApiKey::OffsetCommit)
        .collect();
    assert!(commits.is_empty(), "{commits:?}");
    let last_answer = seen.iter().filter_map(|s| s.answered).max().unwrap();
    let quiet = lost_at - last_answer;
    assert!(
        quiet <= SESSION + call() + SLACK,
        "lost only after {quiet:?} without an answer"
    );
    let oks = rig.table.group_ok();
    let on: Vec<_> = oks
        .iter()
        .filter(|(t, ok)| *ok && *t > last_answer + ms(50))
        .collect();
    assert!(
        on.is_empty(),
        "readiness on with no coordinator answer: {on:?}"
    );
    assert!(
        oks.iter().any(|(t, ok)| !ok && *t > silent_from),
        "readiness never turned off: {oks:?}"
    );
}
