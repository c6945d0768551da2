//! kafka-io against a real broker (tansu) and a real reference client (librdkafka via
//! confluent-kafka): group membership, commits, lag, records, TLS, reconnects.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
    time::Duration,
};

use anyhow::Result;
use bytes::Bytes;
use kafka_infer_tests::{Broker, Proc, py, unique};
use kafka_io::{
    Cluster, CompressionCodec, Consumer, ConsumerConfig, GroupConfig, OutRecord, Producer,
    ProducerConfig,
};
use serde_json::Value;
use tokio::time::{Instant, timeout};

const SESSION: Duration = Duration::from_secs(4);

fn init_log() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "warn,kafka_io=info".into()))
        .with_test_writer()
        .try_init();
}

fn consumer_config(group: &str, topic: &str) -> ConsumerConfig {
    let mut g = GroupConfig::new(group, vec![topic.to_owned()]);
    // The eager protocol, as the librdkafka members here (range,roundrobin) use: tansu does not
    // let a member without cooperative-sticky into a group that already runs it (Kafka does).
    g.assignors = vec![
        kafka_io::assignor::Assignor::Range,
        kafka_io::assignor::Assignor::RoundRobin,
    ];
    g.session_timeout = SESSION;
    g.heartbeat_interval = Duration::from_millis(500);
    g.rebalance_timeout = SESSION;
    let mut c = ConsumerConfig::new(g);
    c.fetch_max_wait = Duration::from_millis(20);
    c.commit_interval = Duration::from_millis(200);
    c.drain_timeout = Duration::from_secs(2);
    c
}

async fn produce_n(
    cluster: &Arc<Cluster>,
    topic: &str,
    n: usize,
    codec: CompressionCodec,
) -> Result<()> {
    let p = Producer::new(
        cluster.clone(),
        ProducerConfig {
            compression: codec,
            ..Default::default()
        },
    );
    let mut deliveries = Vec::new();
    for i in 0..n {
        let r = OutRecord {
            key: Some(Bytes::from(format!("key-{i}"))),
            value: Some(Bytes::from(format!("value-{i}"))),
            headers: vec![(
                "proto-name".into(),
                Bytes::from_static(b"inference.ModelInferRequest"),
            )],
        };
        deliveries.push(p.send(topic, None, r).await?);
    }
    for d in deliveries {
        d.wait().await?;
    }
    p.close(Duration::from_secs(5)).await?;
    Ok(())
}

/// Receives until `n` records arrived (or the time is up), completing each one.
async fn consume_n(c: &mut Consumer, n: usize, within: Duration) -> Vec<(i32, i64, Bytes)> {
    let acker = c.acker();
    let mut got = Vec::new();
    let deadline = Instant::now() + within;
    while got.len() < n {
        let Ok(Some(batch)) = tokio::time::timeout_at(deadline, c.recv()).await else {
            break;
        };
        for r in &batch.records {
            got.push((
                batch.partition,
                r.offset,
                r.value.clone().unwrap_or_default(),
            ));
            acker.complete(&batch.token(r.offset));
        }
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn produce_then_consume_in_a_group_and_commit() -> Result<()> {
    init_log();
    let broker = Broker::start()?;
    let topic = unique("roundtrip");
    broker.create_topic(&topic, 4)?;
    let cluster = Cluster::connect(broker.settings()).await?;
    produce_n(&cluster, &topic, 200, CompressionCodec::None).await?;

    let group = unique("g");
    let mut c = Consumer::start(cluster.clone(), consumer_config(&group, &topic), None);
    let got = consume_n(&mut c, 200, Duration::from_secs(20)).await;
    assert_eq!(got.len(), 200, "all records consumed");
    let values: BTreeSet<_> = got.iter().map(|(_, _, v)| v.clone()).collect();
    assert_eq!(values.len(), 200, "no duplicates");
    // Keyed records land where Java's partitioner puts them.
    for (p, _, v) in &got {
        let i: usize = std::str::from_utf8(v)?
            .trim_start_matches("value-")
            .parse()?;
        let want = kafka_io::producer::partition_for_key(format!("key-{i}").as_bytes(), 4);
        assert_eq!(*p, want, "record {i}");
    }
    // Commits reach the end: lag 0 on every partition.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let lag = c.lag();
        if lag.len() == 4
            && lag
                .iter()
                .all(|l| l.lag == 0 && l.committed == Some(l.high_watermark))
        {
            break;
        }
        assert!(Instant::now() < deadline, "lag never reached 0: {lag:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    c.close().await;

    // librdkafka's admin client reads the same committed offsets.
    let admin: Value =
        serde_json::from_str(&py("admin.py", &[&broker.bootstrap(), &group, &topic])?)?;
    let committed: i64 = admin["committed"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_i64().unwrap())
        .sum();
    assert_eq!(committed, 200, "{admin}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uncompleted_records_are_not_committed() -> Result<()> {
    init_log();
    let broker = Broker::start()?;
    let topic = unique("partial");
    broker.create_topic(&topic, 1)?;
    let cluster = Cluster::connect(broker.settings()).await?;
    produce_n(&cluster, &topic, 10, CompressionCodec::None).await?;
    let group = unique("g");
    let mut c = Consumer::start(cluster.clone(), consumer_config(&group, &topic), None);
    let acker = c.acker();
    let mut tokens = Vec::new();
    while tokens.len() < 10 {
        let b = timeout(Duration::from_secs(10), c.recv())
            .await?
            .expect("batch");
        tokens.extend(b.records.iter().map(|r| b.token(r.offset)));
    }
    // Complete all but offset 3: the commit must stop at 3.
    for t in tokens.iter().filter(|t| t.offset != 3) {
        acker.complete(t);
    }
    tokio::time::sleep(Duration::from_millis(800)).await;
    let lag = c.lag();
    assert_eq!(lag[0].committed, Some(3), "{lag:?}");
    assert_eq!(lag[0].lag, 7);
    acker.complete(&tokens[3]);
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(c.lag()[0].committed, Some(10));
    c.close().await;
    Ok(())
}

/// Waits for the (kafka-io) members' assignments to cover `n` partitions with no overlap,
/// also counting `others` (librdkafka's current view).
async fn wait_disjoint_cover(
    members: &[&Consumer],
    others: &dyn Fn() -> BTreeSet<i32>,
    n: usize,
    within: Duration,
) -> Vec<BTreeSet<i32>> {
    let deadline = Instant::now() + within;
    loop {
        let mut views: Vec<BTreeSet<i32>> = members
            .iter()
            .map(|c| c.assignment().borrow().iter().map(|(_, p)| *p).collect())
            .collect();
        views.push(others());
        let total: usize = views.iter().map(BTreeSet::len).sum();
        let union: BTreeSet<i32> = views.iter().flatten().copied().collect();
        if total == n && union.len() == n {
            return views;
        }
        assert!(
            Instant::now() < deadline,
            "no disjoint cover of {n} partitions within {within:?}: {views:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Follows the librdkafka member's JSON lines: its latest assignment.
fn follow_member(proc_stdout: std::process::ChildStdout) -> Arc<std::sync::Mutex<BTreeSet<i32>>> {
    use std::io::BufRead;
    let owned = Arc::new(std::sync::Mutex::new(BTreeSet::new()));
    let o = owned.clone();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(proc_stdout)
            .lines()
            .map_while(Result::ok)
        {
            if let Ok(v) = serde_json::from_str::<Value>(&line) {
                let set = v["partitions"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(Value::as_i64)
                            .map(|p| p as i32)
                            .collect()
                    })
                    .unwrap_or_default();
                *o.lock().unwrap() = set;
            }
        }
    });
    owned
}

fn spawn_librdkafka_member(
    bootstrap: &str,
    group: &str,
    topic: &str,
    seconds: u32,
) -> Result<(Proc, Arc<std::sync::Mutex<BTreeSet<i32>>>)> {
    let mut cmd = std::process::Command::new(kafka_infer_tests::python());
    cmd.arg(kafka_infer_tests::repo_root().join("tests/py/group_member.py"))
        .args([
            bootstrap,
            group,
            topic,
            &SESSION.as_millis().to_string(),
            &seconds.to_string(),
        ])
        .stdout(std::process::Stdio::piped());
    let mut child = cmd.stdin(std::process::Stdio::null()).spawn()?;
    let out = child.stdout.take().expect("piped");
    let owned = follow_member(out);
    Ok((Proc::from_child("librdkafka member", child), owned))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_members_and_librdkafka_share_partitions_and_take_over() -> Result<()> {
    init_log();
    let broker = Broker::start()?;
    let topic = unique("split");
    broker.create_topic(&topic, 6)?;
    let cluster = Cluster::connect(broker.settings()).await?;
    let group = unique("g");
    let a = Consumer::start(cluster.clone(), consumer_config(&group, &topic), None);
    let mut b = Consumer::start(cluster.clone(), consumer_config(&group, &topic), None);
    let (rd, rd_owned) = spawn_librdkafka_member(&broker.bootstrap(), &group, &topic, 120)?;
    let rd_view = {
        let o = rd_owned.clone();
        move || o.lock().unwrap().clone()
    };
    let views = wait_disjoint_cover(&[&a, &b], &rd_view, 6, Duration::from_secs(40)).await;
    assert!(
        views.iter().all(|v| v.len() == 2),
        "3 members x 2 partitions: {views:?}"
    );

    // A kafka-io member leaves: the other two take its partitions within 2x session timeout.
    b.close().await;
    let start = Instant::now();
    let views = wait_disjoint_cover(&[&a], &rd_view, 6, SESSION * 2 + Duration::from_secs(2)).await;
    eprintln!("after leave: {views:?} in {:?}", start.elapsed());
    assert!(views.iter().all(|v| v.len() == 3), "{views:?}");

    // The librdkafka member is killed: ours takes everything within 2x session timeout.
    rd.signal("KILL")?;
    let start = Instant::now();
    let nobody = BTreeSet::new;
    wait_disjoint_cover(&[&a], &nobody, 6, SESSION * 2 + Duration::from_secs(2)).await;
    eprintln!("after kill: all 6 in {:?}", start.elapsed());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_kafka_io_member_partitions_move() -> Result<()> {
    init_log();
    let broker = Broker::start()?;
    let topic = unique("kill");
    broker.create_topic(&topic, 6)?;
    let cluster = Cluster::connect(broker.settings()).await?;
    let group = unique("g");
    let a = Consumer::start(cluster.clone(), consumer_config(&group, &topic), None);
    let b = Consumer::start(cluster.clone(), consumer_config(&group, &topic), None);
    let nobody = BTreeSet::new;
    wait_disjoint_cover(&[&a, &b], &nobody, 6, Duration::from_secs(30)).await;
    // Dropping without close = the member vanishes without LeaveGroup (as on SIGKILL).
    drop(b);
    let start = Instant::now();
    wait_disjoint_cover(&[&a], &nobody, 6, SESSION * 2 + Duration::from_secs(2)).await;
    eprintln!("silent member replaced in {:?}", start.elapsed());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lag_matches_keda_view_from_librdkafka_admin() -> Result<()> {
    init_log();
    let broker = Broker::start()?;
    let topic = unique("lag");
    broker.create_topic(&topic, 3)?;
    // One record per produce request (the broker's ListOffsets is wrong after multi-record batches).
    py(
        "produce.py",
        &[&broker.bootstrap(), &topic, "none", "30", "1"],
    )?;
    let cluster = Cluster::connect(broker.settings()).await?;
    let group = unique("g");
    let mut c = Consumer::start(cluster.clone(), consumer_config(&group, &topic), None);
    // Complete only some records so lag is neither 0 nor everything.
    let acker = c.acker();
    let mut seen = 0;
    let mut completed = 0;
    while seen < 30 {
        let b = timeout(Duration::from_secs(10), c.recv())
            .await?
            .expect("batch");
        for r in &b.records {
            seen += 1;
            if r.offset < 4 {
                acker.complete(&b.token(r.offset));
                completed += 1;
            }
        }
    }
    tokio::time::sleep(Duration::from_millis(800)).await;
    let ours: i64 = c.lag().iter().map(|l| l.lag).sum();
    let admin: Value =
        serde_json::from_str(&py("admin.py", &[&broker.bootstrap(), &group, &topic])?)?;
    assert_eq!(
        admin["lag"].as_i64(),
        Some(ours),
        "ours {ours}, KEDA-style {admin}"
    );
    assert_eq!(ours, 30 - completed, "{admin}");
    drop(c);
    Ok(())
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_from_librdkafka_arrive_intact_with_every_codec() -> Result<()> {
    init_log();
    let broker = Broker::start()?;
    let cluster = Cluster::connect(broker.settings()).await?;
    for codec in ["none", "gzip", "snappy", "lz4", "zstd"] {
        let topic = unique(&format!("in-{codec}"));
        broker.create_topic(&topic, 2)?;
        let sent: Value = serde_json::from_str(&py(
            "produce.py",
            &[&broker.bootstrap(), &topic, codec, "50"],
        )?)?;
        let mut c = Consumer::start(cluster.clone(), consumer_config(&unique("g"), &topic), None);
        let acker = c.acker();
        let mut got = BTreeMap::new();
        let deadline = Instant::now() + Duration::from_secs(15);
        while got.len() < 50 && Instant::now() < deadline {
            let Ok(Some(b)) = tokio::time::timeout_at(deadline, c.recv()).await else {
                break;
            };
            for r in &b.records {
                let key = hex(r.key.as_deref().unwrap_or_default());
                let headers: BTreeMap<String, String> =
                    r.headers.iter().map(|(k, v)| (k.clone(), hex(v))).collect();
                got.insert(key, (hex(r.value.as_deref().unwrap_or_default()), headers));
                acker.complete(&b.token(r.offset));
            }
        }
        for s in sent.as_array().unwrap() {
            let (v, h) = got
                .get(s["key"].as_str().unwrap())
                .unwrap_or_else(|| panic!("{codec}: {s} missing"));
            assert_eq!(v, s["value"].as_str().unwrap(), "{codec} value");
            let want: BTreeMap<String, String> = serde_json::from_value(s["headers"].clone())?;
            assert_eq!(h, &want, "{codec} headers");
        }
        c.close().await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_from_kafka_io_arrive_intact_in_librdkafka_with_every_codec() -> Result<()> {
    init_log();
    let broker = Broker::start()?;
    let cluster = Cluster::connect(broker.settings()).await?;
    for codec in [
        CompressionCodec::None,
        CompressionCodec::Gzip,
        CompressionCodec::Snappy,
        CompressionCodec::Lz4,
        CompressionCodec::Zstd,
    ] {
        let topic = unique("out");
        broker.create_topic(&topic, 4)?;
        produce_n(&cluster, &topic, 40, codec).await?;
        let got: Value = serde_json::from_str(&py(
            "consume.py",
            &[&broker.bootstrap(), &topic, "40", "15"],
        )?)?;
        let got = got.as_array().unwrap();
        assert_eq!(got.len(), 40, "{codec:?}");
        for m in got {
            let key = String::from_utf8(kafka_infer_tests::unhex(m["key"].as_str().unwrap()))?;
            let i: usize = key.trim_start_matches("key-").parse()?;
            assert_eq!(
                kafka_infer_tests::unhex(m["value"].as_str().unwrap()),
                format!("value-{i}").as_bytes()
            );
            assert_eq!(
                m["headers"]["proto-name"].as_str().unwrap(),
                hex(b"inference.ModelInferRequest")
            );
            // Same partition as librdkafka's murmur2 partitioner would pick.
            assert_eq!(
                m["partition"].as_i64().unwrap() as i32,
                kafka_io::producer::partition_for_key(key.as_bytes(), 4)
            );
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_restart_mid_consume_reconnects() -> Result<()> {
    init_log();
    let mut broker = Broker::start()?;
    let topic = unique("restart");
    broker.create_topic(&topic, 2)?;
    let cluster = Cluster::connect(broker.settings()).await?;
    produce_n(&cluster, &topic, 20, CompressionCodec::None).await?;
    let mut c = Consumer::start(cluster.clone(), consumer_config(&unique("g"), &topic), None);
    assert_eq!(
        consume_n(&mut c, 20, Duration::from_secs(15)).await.len(),
        20
    );

    broker.restart()?; // same port; memory storage, so the topic starts empty again
    // The consumer's metadata requests may have the broker auto-create it first: fine.
    let cluster2 = Cluster::connect(broker.settings()).await?;
    cluster2.create_topic(&topic, 2).await?;
    produce_n(&cluster2, &topic, 10, CompressionCodec::None).await?;
    let got = consume_n(&mut c, 10, Duration::from_secs(40)).await;
    let values: BTreeSet<_> = got.iter().map(|(_, _, v)| v.clone()).collect();
    assert_eq!(values.len(), 10, "records after the restart: {got:?}");
    assert!(c.is_connected());
    c.close().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebalance_runs_the_revoke_hook_and_commits_work_finished_during_the_drain() -> Result<()> {
    init_log();
    let broker = Broker::start()?;
    let topic = unique("revoke");
    broker.create_topic(&topic, 2)?;
    let cluster = Cluster::connect(broker.settings()).await?;
    produce_n(&cluster, &topic, 20, CompressionCodec::None).await?;
    let group = unique("g");
    let revoked = Arc::new(std::sync::Mutex::new(Vec::new()));
    let hook: kafka_io::consumer::RevokeHook = {
        let revoked = revoked.clone();
        Arc::new(move |tps| {
            revoked.lock().unwrap().extend(tps);
            Box::pin(async {})
        })
    };
    let mut cfg = consumer_config(&group, &topic);
    cfg.drain_timeout = Duration::from_secs(3);
    cfg.commit_interval = Duration::from_secs(60); // only the revoke commits
    let mut a = Consumer::start(cluster.clone(), cfg, Some(hook));
    // Hold every record uncompleted.
    let mut tokens = Vec::new();
    while tokens.len() < 20 {
        let b = timeout(Duration::from_secs(10), a.recv())
            .await?
            .expect("batch");
        tokens.extend(b.records.iter().map(|r| b.token(r.offset)));
    }
    // Finish them while the drain waits, after the rebalance has begun.
    let acker = a.acker();
    let finisher = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        for t in &tokens {
            acker.complete(t);
        }
    });
    let b = Consumer::start(cluster.clone(), consumer_config(&group, &topic), None);
    let nobody = BTreeSet::new;
    wait_disjoint_cover(&[&a, &b], &nobody, 2, Duration::from_secs(30)).await;
    finisher.await?;
    assert_eq!(
        revoked.lock().unwrap().len(),
        2,
        "hook saw both partitions go"
    );
    let admin: Value =
        serde_json::from_str(&py("admin.py", &[&broker.bootstrap(), &group, &topic])?)?;
    let committed: i64 = admin["committed"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_i64().unwrap())
        .sum();
    assert_eq!(
        committed, 20,
        "work finished during the drain was committed: {admin}"
    );
    drop(a);
    Ok(())
}

/// While the caller signals pressure (more records on their way), a partition's writer lingers
/// (up to `linger_max`), so a record sent meanwhile goes out with the first; when the pressure
/// ends the batch goes at once; without pressure a record is written after the short linger.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producer_lingers_longer_under_pressure() -> Result<()> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    init_log();
    let broker = Broker::start()?;
    let topic = unique("linger");
    broker.create_topic(&topic, 1)?;
    let cluster = Cluster::connect(broker.settings()).await?;
    let pressure = Arc::new(AtomicUsize::new(0));
    let p = Producer::new(
        cluster.clone(),
        ProducerConfig {
            linger: Duration::from_millis(2),
            linger_max: Duration::from_secs(3),
            pressure: Some(pressure.clone()),
            ..Default::default()
        },
    );
    let rec = |i: u32| OutRecord {
        key: None,
        value: Some(Bytes::from(format!("v{i}"))),
        headers: Vec::new(),
    };
    // The writer exists and knows the partition's leader.
    p.send(&topic, Some(0), rec(0)).await?.wait().await?;

    // No pressure: written after the short linger, long before linger_max.
    let t = Instant::now();
    let o1 = p.send(&topic, Some(0), rec(1)).await?.wait().await?;
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "{:?} without pressure",
        t.elapsed()
    );

    // Pressure: the first record waits for company; the second, sent 300 ms later, joins it;
    // the batch goes when the pressure ends, not at linger_max.
    pressure.store(1, Ordering::Relaxed);
    let first = tokio::spawn(p.send(&topic, Some(0), rec(2)).await?.wait());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !first.is_finished(),
        "written before linger_max under pressure"
    );
    let second = p.send(&topic, Some(0), rec(3)).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!first.is_finished(), "written while the pressure lasted");
    pressure.store(0, Ordering::Relaxed);
    let released = Instant::now();
    let o2 = first.await??;
    let o3 = second.wait().await?;
    assert_eq!((o2, o3), (o1 + 1, o1 + 2));
    assert!(
        released.elapsed() < Duration::from_secs(2),
        "written {:?} after the pressure ended (linger_max 3 s)",
        released.elapsed()
    );
    p.close(Duration::from_secs(5)).await?;
    Ok(())
}

/// The fetch shape against the test broker, counted by the tests' TCP proxy (it sees every
/// request frame): an idle member of 16 partitions sends one Fetch per broker per max-wait,
/// not one per partition, and records still arrive on every partition.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_fetch_per_broker_for_sixteen_partitions_against_the_test_broker() -> Result<()> {
    init_log();
    let pb = kafka_infer_tests::proxy::ProxiedBroker::start()?;
    let topic = unique("shape");
    pb.create_topic(&topic, 16)?;
    let (broker, proxy) = pb.into_parts();
    let settings = kafka_io::ConnectionSettings::plaintext(&proxy.bootstrap())?;
    let cluster = Cluster::connect(settings).await?;
    let mut cfg = consumer_config(&unique("g"), &topic);
    let wait = Duration::from_millis(100);
    cfg.fetch_max_wait = wait;
    let mut c = Consumer::start(cluster.clone(), cfg, None);
    let mut streams = Vec::new();
    while streams.len() < 16 {
        let s = timeout(Duration::from_secs(30), c.next_stream())
            .await?
            .expect("consumer open");
        streams.push(s);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    const FETCH: i16 = 1;
    let before = proxy.requests().get(&FETCH).copied().unwrap_or(0);
    let window = Duration::from_secs(3);
    tokio::time::sleep(window).await;
    let fetches = proxy.requests().get(&FETCH).copied().unwrap_or(0) - before;
    eprintln!("idle on 16 partitions: {fetches} Fetch requests in {window:?} at max-wait {wait:?}");
    // One broker: 3 s / 100 ms = 30 (one per partition would be 480).
    assert!(
        (10..=45).contains(&fetches),
        "{fetches} Fetch requests in {window:?}: one per broker per max-wait is 30"
    );
    // Records on a few partitions still come through.
    produce_n(&cluster, &topic, 64, CompressionCodec::None).await?;
    let mut got = 0;
    let deadline = Instant::now() + Duration::from_secs(20);
    let acker = c.acker();
    while got < 64 {
        assert!(
            Instant::now() < deadline,
            "only {got} of 64 records within 20 s"
        );
        for s in streams.iter_mut() {
            if let Ok(Some(b)) = timeout(Duration::from_millis(20), s.recv()).await {
                for r in &b.records {
                    acker.complete(&b.token(r.offset));
                }
                got += b.records.len();
            }
        }
    }
    drop(streams);
    c.close().await;
    drop(broker);
    Ok(())
}
