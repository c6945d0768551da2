//! The fetcher's shape against a fake two-broker cluster (tests/fake_broker): one Fetch per
//! leader broker for every partition it leads (not one per partition), fetch sessions (idle
//! requests name no partition), a partition whose records are not finished left out (paused)
//! while the others go on, a leader move followed, records sliced by the memory budget, and an
//! offset reset with records in flight after which commits go on.
//!
//! Real time, short durations; every wait is bounded.

mod fake_broker;

use std::time::Duration;

use fake_broker::{FakeBroker, Seen, Tp};
use kafka_io::{Batch, Consumer, ConsumerConfig, GroupConfig, PartitionStream};
use tokio::time::Instant;

const TOPIC: &str = "in";
const WAIT: Duration = Duration::from_millis(50);

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn tps(ps: &[i32]) -> Vec<Tp> {
    ps.iter().map(|p| (TOPIC.to_owned(), *p)).collect()
}

fn config(budget: usize) -> ConsumerConfig {
    let mut g = GroupConfig::new("g", vec![TOPIC.to_owned()]);
    g.session_timeout = ms(1500);
    g.heartbeat_interval = ms(300);
    g.rebalance_timeout = ms(1000);
    let mut c = ConsumerConfig::new(g);
    c.fetch_max_wait = WAIT;
    c.drain_timeout = ms(1000);
    c.fetch_buffer_bytes = budget;
    c
}

/// A fake cluster of `brokers` with `partitions` of TOPIC, every partition assigned to us,
/// partition p led by broker p % brokers.
async fn cluster(brokers: usize, partitions: i32) -> FakeBroker {
    let fake = FakeBroker::start_cluster(&[(TOPIC, partitions)], brokers).await;
    for p in 0..partitions {
        fake.set_leader(TOPIC, p, p % brokers as i32);
    }
    fake.assign(&tps(&(0..partitions).collect::<Vec<_>>()));
    fake
}

async fn start(fake: &FakeBroker, budget: usize) -> Consumer {
    let cluster = tokio::time::timeout(ms(5000), fake.cluster())
        .await
        .expect("Cluster::connect within 5 s");
    Consumer::start(cluster, config(budget), None)
}

async fn streams(c: &mut Consumer, n: usize) -> Vec<PartitionStream> {
    let mut out = Vec::new();
    while out.len() < n {
        let s = tokio::time::timeout(ms(5000), c.next_stream())
            .await
            .expect("streams within 5 s")
            .expect("consumer open");
        out.push(s);
    }
    out.sort_by_key(|s| s.partition);
    out
}

/// The Fetch requests read since `from`.
fn fetches_since(fake: &FakeBroker, from: Instant) -> Vec<Seen> {
    fake.fetches()
        .into_iter()
        .filter(|s| s.at >= from)
        .collect()
}

/// Receives from `s` until a record at `offset` or later arrived (within 5 s); the batches.
async fn recv_until(s: &mut PartitionStream, offset: i64) -> Vec<Batch> {
    let deadline = Instant::now() + ms(5000);
    let mut got = Vec::new();
    loop {
        let b = tokio::time::timeout_at(deadline, s.recv())
            .await
            .unwrap_or_else(|_| panic!("partition {}: offset {offset} within 5 s", s.partition))
            .expect("stream open");
        let done = b.records.last().is_some_and(|r| r.offset >= offset);
        got.push(b);
        if done {
            return got;
        }
    }
}

#[tokio::test]
async fn one_fetch_per_broker_covers_every_partition_it_leads() {
    let fake = cluster(2, 8).await;
    let mut c = start(&fake, 32 << 20).await;
    let _streams = streams(&mut c, 8).await;
    // Idle: every fetch waits its max-wait at the fake.
    tokio::time::sleep(ms(300)).await;
    let from = Instant::now();
    tokio::time::sleep(ms(1000)).await;
    let seen = fetches_since(&fake, from);
    for f in &seen {
        for (_, p, _) in &f.fetched {
            assert_eq!(
                p % 2,
                f.node,
                "partition {p} fetched from broker {}",
                f.node
            );
        }
        assert_eq!(
            f.fetched.len(),
            4,
            "every request names the broker's 4 partitions: {f:?}"
        );
    }
    // One request per broker per max-wait: 2 x 1000 / 50 = 40; one per partition would be 160.
    assert!(
        (20..=60).contains(&seen.len()),
        "{} Fetch requests in 1 s for 2 brokers at {WAIT:?}",
        seen.len()
    );
    c.close().await;
}

#[tokio::test]
async fn fetch_sessions_send_only_what_changed() {
    let fake = cluster(2, 8).await;
    fake.fetch_sessions(true);
    let mut c = start(&fake, 32 << 20).await;
    let mut streams = streams(&mut c, 8).await;
    tokio::time::sleep(ms(300)).await;
    let from = Instant::now();
    tokio::time::sleep(ms(500)).await;
    let idle = fetches_since(&fake, from);
    assert!(idle.len() >= 6, "{} idle fetches", idle.len());
    for f in &idle {
        assert!(f.session.0 > 0 && f.session.1 > 0, "in a session: {f:?}");
        assert!(
            f.fetched.is_empty(),
            "an idle incremental fetch names no partition: {f:?}"
        );
    }
    // Records on partition 3 come through the session; its next request names only it.
    fake.log_end(TOPIC, 3, 5);
    let got = recv_until(&mut streams[3], 4).await;
    assert_eq!(got.iter().map(|b| b.records.len()).sum::<usize>(), 5);
    let from = Instant::now();
    tokio::time::sleep(ms(300)).await;
    let after: Vec<Seen> = fetches_since(&fake, from);
    assert!(
        after
            .iter()
            .any(|f| f.fetched == vec![(TOPIC.to_owned(), 3, 5)]),
        "partition 3's new position is sent alone: {after:?}"
    );
    c.close().await;
}

#[tokio::test]
async fn a_full_partition_is_left_out_while_the_others_go_on() {
    let fake = cluster(2, 4).await;
    // Each partition's share: 64 KiB / 4 = 16 KiB, ~60 records of ~270 bytes; it pauses at half.
    let mut c = start(&fake, 64 << 10).await;
    let mut streams = streams(&mut c, 4).await;
    fake.log_end(TOPIC, 0, 10_000);
    // Nobody reads partition 0: its records wait in its channel, holding their charge.
    tokio::time::sleep(ms(600)).await;
    let from = Instant::now();
    fake.log_end(TOPIC, 2, 3);
    // Partition 2 shares broker 0 with the full partition 0: it still gets its records.
    let got = recv_until(&mut streams[2], 2).await;
    assert_eq!(got.iter().map(|b| b.records.len()).sum::<usize>(), 3);
    tokio::time::sleep(ms(300)).await;
    let paused = fetches_since(&fake, from);
    assert!(!paused.is_empty());
    assert!(
        paused
            .iter()
            .all(|f| !f.fetched.iter().any(|(_, p, _)| *p == 0)),
        "the full partition 0 is left out: {paused:?}"
    );
    assert!(
        paused
            .iter()
            .any(|f| f.node == 0 && f.fetched.iter().any(|(_, p, _)| *p == 2)),
        "its broker goes on fetching partition 2"
    );
    let budget = c.budget();
    assert!(
        budget.held() <= budget.limit(),
        "{} held of {}",
        budget.held(),
        budget.limit()
    );
    // Reading partition 0 frees its share: it is fetched again, in slices, to the end.
    let mut last = -1;
    let deadline = Instant::now() + ms(10_000);
    while last < 9_999 {
        let b = tokio::time::timeout_at(deadline, streams[0].recv())
            .await
            .expect("partition 0 read to its end within 10 s")
            .expect("open");
        for r in &b.records {
            assert_eq!(r.offset, last + 1, "in order, none skipped");
            last = r.offset;
        }
        assert!(
            budget.held() <= budget.limit(),
            "held {} of {}",
            budget.held(),
            budget.limit()
        );
    }
    c.close().await;
}

#[tokio::test]
async fn a_leader_move_is_followed() {
    let fake = cluster(2, 2).await;
    let mut c = start(&fake, 32 << 20).await;
    let mut streams = streams(&mut c, 2).await;
    fake.log_end(TOPIC, 0, 3);
    recv_until(&mut streams[0], 2).await;
    // Partition 0 moves from broker 0 to broker 1: broker 0 answers NOT_LEADER_OR_FOLLOWER.
    fake.set_leader(TOPIC, 0, 1);
    fake.log_end(TOPIC, 0, 6);
    let got = recv_until(&mut streams[0], 5).await;
    let offsets: Vec<i64> = got
        .iter()
        .flat_map(|b| b.records.iter().map(|r| r.offset))
        .collect();
    assert_eq!(offsets, vec![3, 4, 5]);
    let from = Instant::now();
    tokio::time::sleep(ms(300)).await;
    let now = fetches_since(&fake, from);
    let p0: Vec<&Seen> = now
        .iter()
        .filter(|f| f.fetched.iter().any(|(_, p, _)| *p == 0))
        .collect();
    assert!(!p0.is_empty());
    assert!(
        p0.iter().all(|f| f.node == 1),
        "partition 0 is fetched from its new leader: {p0:?}"
    );
    assert!(
        now.iter().any(|f| f.node == 1 && f.fetched.len() == 2),
        "in the same request as partition 1"
    );
    c.close().await;
}

#[tokio::test]
async fn an_offset_reset_with_records_in_flight_lets_commits_go_on() {
    let fake = cluster(1, 1).await;
    let mut c = start(&fake, 32 << 20).await;
    let acker = c.acker();
    let mut streams = streams(&mut c, 1).await;
    fake.log_end(TOPIC, 0, 10);
    // Records 0..10 in flight (not completed).
    let old = recv_until(&mut streams[0], 9).await;
    // The log is replaced by a shorter one (e.g. the topic was deleted and made again): the
    // position 10 is past its end, the reset (earliest) goes back to 0.
    fake.log_start(TOPIC, 0, 0);
    fake.log_end(TOPIC, 0, 0);
    tokio::time::sleep(ms(300)).await;
    fake.log_end(TOPIC, 0, 5);
    let new = recv_until(&mut streams[0], 4).await;
    let offsets: Vec<i64> = new
        .iter()
        .flat_map(|b| b.records.iter().map(|r| r.offset))
        .collect();
    assert_eq!(offsets, vec![0, 1, 2, 3, 4]);
    // The records from before the reset finish too (a worker would), in any order.
    for b in old.iter().rev() {
        for r in b.records.iter().rev() {
            acker.complete(&b.token(r.offset));
        }
    }
    for b in &new {
        for r in &b.records {
            acker.complete(&b.token(r.offset));
        }
    }
    let deadline = Instant::now() + ms(5000);
    while fake.committed(TOPIC, 0) != Some(5) {
        assert!(
            Instant::now() < deadline,
            "commits go on after the reset: committed {:?}",
            fake.committed(TOPIC, 0)
        );
        tokio::time::sleep(ms(20)).await;
    }
    // And on: new records are committed as they finish.
    fake.log_end(TOPIC, 0, 8);
    for b in recv_until(&mut streams[0], 7).await {
        for r in &b.records {
            acker.complete(&b.token(r.offset));
        }
    }
    let deadline = Instant::now() + ms(5000);
    while fake.committed(TOPIC, 0) != Some(8) {
        assert!(Instant::now() < deadline, "{:?}", fake.committed(TOPIC, 0));
        tokio::time::sleep(ms(20)).await;
    }
    c.close().await;
}

#[tokio::test]
async fn a_record_larger_than_the_whole_budget_stalls_its_partition_and_says_so() {
    let fake = cluster(1, 2).await;
    // 200 bytes: less than one record's bookkeeping (256), so no record of the fake fits.
    let mut c = start(&fake, 200).await;
    let mut streams = streams(&mut c, 2).await;
    fake.log_end(TOPIC, 1, 3);
    let deadline = Instant::now() + ms(5000);
    while c.stalled().is_empty() {
        assert!(Instant::now() < deadline, "no stall reported within 5 s");
        tokio::time::sleep(ms(20)).await;
    }
    let stalled = c.stalled();
    assert_eq!(stalled.len(), 1, "{stalled:?}");
    assert_eq!(stalled[0].0, (TOPIC.to_owned(), 1));
    assert!(
        stalled[0].1.contains("--fetch-buffer-bytes") && stalled[0].1.contains("offset 0"),
        "names the flag to raise and the record: {}",
        stalled[0].1
    );
    // Nothing skipped: the partition hands out nothing past the record it cannot take.
    let r = tokio::time::timeout(ms(300), streams[1].recv()).await;
    assert!(r.is_err(), "no records handed out: {r:?}");
    assert_eq!(c.budget().held(), 0);
    c.close().await;
}

#[tokio::test]
async fn records_larger_than_a_share_but_within_the_budget_all_come_through() {
    let fake = cluster(1, 4).await;
    // 4 partitions share 1000 bytes: 250 each, less than one record (~262); the whole budget
    // takes three at a time.
    let mut c = start(&fake, 1000).await;
    let mut streams = streams(&mut c, 4).await;
    for p in 0..4 {
        fake.log_end(TOPIC, p, 20);
    }
    let budget = c.budget();
    let deadline = Instant::now() + ms(20_000);
    let mut next = [0i64; 4];
    while next.iter().any(|n| *n < 20) {
        assert!(
            Instant::now() < deadline,
            "every record within 20 s: next offsets {next:?}"
        );
        for (i, s) in streams.iter_mut().enumerate() {
            if let Ok(Some(b)) = tokio::time::timeout(ms(10), s.recv()).await {
                for r in &b.records {
                    assert_eq!(r.offset, next[i], "partition {i} in order");
                    next[i] += 1;
                }
                assert!(
                    budget.held() <= budget.limit(),
                    "held {} of {}",
                    budget.held(),
                    budget.limit()
                );
            }
        }
    }
    assert!(c.stalled().is_empty());
    c.close().await;
}
