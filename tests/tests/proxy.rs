//! The fault proxy: each mode against a small echo server, then the test broker behind it.

use std::{
    io::{ErrorKind, Read, Write},
    net::{SocketAddr, TcpStream},
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};
use bytes::Bytes;
use kafka_infer_tests::{
    self as fx,
    proxy::{FaultProxy, Mode, ProxiedBroker, run_bounded},
};
use kafka_io::{Cluster, OutRecord, Producer, ProducerConfig};
use tokio::sync::oneshot;

/// An echo server on 127.0.0.1 that counts the connections it accepts; stops when dropped.
struct Echo {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Echo {
    fn start() -> Result<Self> {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        l.set_nonblocking(true)?;
        let addr = l.local_addr()?;
        let accepted = Arc::new(AtomicUsize::new(0));
        let (stop, stopped) = oneshot::channel::<()>();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let n = accepted.clone();
        let thread = std::thread::spawn(move || {
            rt.block_on(async move {
                let l = tokio::net::TcpListener::from_std(l).expect("echo listener");
                let serve = async {
                    while let Ok((mut s, _)) = l.accept().await {
                        n.fetch_add(1, Ordering::SeqCst);
                        tokio::spawn(async move {
                            let (mut r, mut w) = s.split();
                            let _ = tokio::io::copy(&mut r, &mut w).await;
                        });
                    }
                };
                tokio::select! {
                    _ = stopped => {}
                    _ = serve => {}
                }
            });
        });
        Ok(Self {
            addr,
            accepted,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn client(p: &FaultProxy) -> Result<TcpStream> {
    let s = TcpStream::connect(p.addr())?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.set_nodelay(true)?;
    Ok(s)
}

/// Sends `msg` and reads as many bytes back.
fn echo(s: &mut TcpStream, msg: &[u8]) -> Result<Vec<u8>> {
    s.write_all(msg)?;
    read_n(s, msg.len())
}

fn read_n(s: &mut TcpStream, n: usize) -> Result<Vec<u8>> {
    let mut got = vec![0; n];
    s.read_exact(&mut got)?;
    Ok(got)
}

/// The error kind of a read that is expected to fail (within the stream's read timeout).
fn read_error(s: &mut TcpStream) -> Result<ErrorKind> {
    let mut b = [0u8; 64];
    match s.read(&mut b) {
        Ok(0) => anyhow::bail!("the connection was closed (EOF)"),
        Ok(n) => anyhow::bail!("{n} bytes came through: {:?}", &b[..n]),
        Err(e) => Ok(e.kind()),
    }
}

fn is_timeout(k: ErrorKind) -> bool {
    matches!(k, ErrorKind::WouldBlock | ErrorKind::TimedOut)
}

#[test]
fn pass_forwards_both_ways_and_counts_connections() -> Result<()> {
    let e = Echo::start()?;
    let p = FaultProxy::start(e.addr)?;
    assert_eq!(p.mode(), Mode::Pass);
    let mut a = client(&p)?;
    assert_eq!(echo(&mut a, b"hello")?, b"hello");
    let big: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let mut b = client(&p)?;
    let writer = {
        let mut b = b.try_clone()?;
        let big = big.clone();
        std::thread::spawn(move || b.write_all(&big))
    };
    assert_eq!(
        read_n(&mut b, big.len())?,
        big,
        "a large payload arrives whole"
    );
    writer.join().expect("writer thread")?;
    assert_eq!(p.accepted(), 2);
    assert_eq!(p.wait_open(Duration::from_secs(5), |n| n == 2)?, 2);
    assert_eq!(e.accepted(), 2);
    drop(a);
    p.wait_open(Duration::from_secs(5), |n| n == 1)
        .context("a closed client's connection is no longer open")?;
    assert_eq!(echo(&mut b, b"still")?, b"still");
    Ok(())
}

#[test]
fn delay_holds_every_chunk_in_both_directions() -> Result<()> {
    let e = Echo::start()?;
    let p = FaultProxy::start(e.addr)?;
    let mut s = client(&p)?;
    let rtt = |s: &mut TcpStream, m: &[u8]| -> Result<Duration> {
        let t = Instant::now();
        ensure!(echo(s, m)? == m, "echo differs");
        Ok(t.elapsed())
    };
    assert!(rtt(&mut s, b"warm")? < Duration::from_millis(250));
    p.set_mode(Mode::Delay(Duration::from_millis(300)));
    let slow = rtt(&mut s, b"slow")?;
    assert!(
        slow >= Duration::from_millis(600) && slow < Duration::from_secs(4),
        "two delayed hops: {slow:?}"
    );
    // A new connection is delayed too.
    let mut s2 = client(&p)?;
    assert!(rtt(&mut s2, b"new")? >= Duration::from_millis(600));
    p.set_mode(Mode::Pass);
    assert!(rtt(&mut s, b"fast")? < Duration::from_millis(250));
    Ok(())
}

#[test]
fn blackhole_answers_nothing_closes_nothing_and_resumes_on_pass() -> Result<()> {
    let e = Echo::start()?;
    let p = FaultProxy::start(e.addr)?;
    let mut a = client(&p)?;
    assert_eq!(echo(&mut a, b"before")?, b"before");
    p.set_mode(Mode::Blackhole);
    a.set_read_timeout(Some(Duration::from_millis(700)))?;
    a.write_all(b"held")?;
    let k = read_error(&mut a)?;
    assert!(is_timeout(k), "a read times out: {k:?}");
    // A new connection is accepted, but reaches nothing.
    let mut b = client(&p)?;
    b.set_read_timeout(Some(Duration::from_millis(700)))?;
    b.write_all(b"new")?;
    let k = read_error(&mut b)?;
    assert!(is_timeout(k), "a read times out: {k:?}");
    assert_eq!(p.accepted(), 2);
    assert_eq!(
        e.accepted(),
        1,
        "the target heard nothing of the new connection"
    );
    assert_eq!(p.open(), 2, "nothing was closed");
    p.set_mode(Mode::Pass);
    a.set_read_timeout(Some(Duration::from_secs(5)))?;
    b.set_read_timeout(Some(Duration::from_secs(5)))?;
    assert_eq!(
        read_n(&mut a, 4)?,
        b"held",
        "held bytes go through after Pass"
    );
    assert_eq!(read_n(&mut b, 3)?, b"new");
    assert_eq!(echo(&mut a, b"after")?, b"after");
    assert_eq!(e.accepted(), 2);
    Ok(())
}

#[test]
fn reset_resets_current_and_new_connections() -> Result<()> {
    let e = Echo::start()?;
    let p = FaultProxy::start(e.addr)?;
    let mut a = client(&p)?;
    assert_eq!(echo(&mut a, b"before")?, b"before");
    p.set_mode(Mode::Reset);
    assert_eq!(read_error(&mut a)?, ErrorKind::ConnectionReset);
    let mut b = client(&p)?;
    assert_eq!(read_error(&mut b)?, ErrorKind::ConnectionReset);
    assert_eq!(p.accepted(), 2);
    p.wait_open(Duration::from_secs(5), |n| n == 0)?;
    p.set_mode(Mode::Pass);
    let mut c = client(&p)?;
    assert_eq!(echo(&mut c, b"again")?, b"again");
    Ok(())
}

fn proxy_threads(port: u16) -> Result<usize> {
    let name = format!("fproxy-{port}");
    let mut n = 0;
    for t in std::fs::read_dir("/proc/self/task")? {
        let comm = std::fs::read_to_string(t?.path().join("comm")).unwrap_or_default();
        n += usize::from(comm.trim() == name);
    }
    Ok(n)
}

#[test]
fn drop_stops_the_thread_and_closes_everything() -> Result<()> {
    let e = Echo::start()?;
    let p = FaultProxy::start(e.addr)?;
    let port = p.port();
    let mut a = client(&p)?;
    assert_eq!(echo(&mut a, b"x")?, b"x");
    p.set_mode(Mode::Blackhole);
    let mut b = client(&p)?;
    assert_eq!(proxy_threads(port)?, 1);
    let t = Instant::now();
    drop(p);
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "drop took {:?}",
        t.elapsed()
    );
    assert_eq!(proxy_threads(port)?, 0);
    for s in [&mut a, &mut b] {
        let mut buf = [0u8; 8];
        match s.read(&mut buf) {
            Ok(0) => {}
            Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
            other => anyhow::bail!("a client of a dropped proxy reads {other:?}"),
        }
    }
    let refused = TcpStream::connect(("127.0.0.1", port));
    assert!(refused.is_err(), "nothing listens any more");
    Ok(())
}

/// The ports of the brokers in the metadata librdkafka gets from `bootstrap`.
fn advertised_ports(bootstrap: &str) -> Result<Vec<u16>> {
    let script = "import json, sys\n\
        from confluent_kafka.admin import AdminClient\n\
        md = AdminClient({'bootstrap.servers': sys.argv[1]}).list_topics(timeout=10)\n\
        print(json.dumps(sorted(b.port for b in md.brokers.values())))";
    let out = run_bounded(
        Command::new(fx::python()).args(["-c", script, bootstrap]),
        Duration::from_secs(30),
    )?;
    ensure!(
        out.status.success(),
        "metadata: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(serde_json::from_slice(&out.stdout)?)
}

#[test]
fn broker_behind_the_proxy_serves_every_connection_through_it() -> Result<()> {
    let b = ProxiedBroker::start()?;
    assert_eq!(advertised_ports(&b.bootstrap())?, [b.proxy.port()]);
    let topic = fx::unique("proxied");
    b.create_topic(&topic, 2)?;
    let sent: serde_json::Value = serde_json::from_str(&fx::py(
        "produce.py",
        &[&b.bootstrap(), &topic, "none", "20"],
    )?)?;
    let got = fx::read_topic(&b.bootstrap(), &topic, 20, 30)?;
    let mut sent_values: Vec<Vec<u8>> = sent
        .as_array()
        .context("produce.py printed no list")?
        .iter()
        .map(|r| fx::unhex(r["value"].as_str().unwrap_or_default()))
        .collect();
    let mut got_values: Vec<Vec<u8>> = got.into_iter().map(|a| a.value).collect();
    sent_values.sort();
    got_values.sort();
    assert_eq!(got_values, sent_values);
    assert!(
        b.proxy.accepted() >= 4,
        "bootstrap and broker connections of the CLI and both clients: {}",
        b.proxy.accepted()
    );
    Ok(())
}

/// A raw ApiVersions v0 request (correlation id `id`), as the first thing a client says.
fn api_versions(id: i32) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&18i16.to_be_bytes()); // ApiVersions
    body.extend_from_slice(&0i16.to_be_bytes()); // v0
    body.extend_from_slice(&id.to_be_bytes());
    body.extend_from_slice(&(-1i16).to_be_bytes()); // null client id
    let mut req = (body.len() as i32).to_be_bytes().to_vec();
    req.extend(body);
    req
}

/// Reads one response; returns its correlation id.
fn response_id(s: &mut TcpStream) -> std::io::Result<i32> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len)?;
    let mut body = vec![0u8; i32::from_be_bytes(len).max(0) as usize];
    s.read_exact(&mut body)?;
    Ok(i32::from_be_bytes(body[..4].try_into().expect("4 bytes")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_blackhole_a_clients_request_does_not_complete() -> Result<()> {
    let b = ProxiedBroker::start()?;
    let topic = fx::unique("blackhole");
    b.create_topic(&topic, 1)?;

    // One request on one connection: no answer while blackholed, the answer after Pass.
    let mut s = TcpStream::connect(b.proxy.addr())?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(&api_versions(1))?;
    assert_eq!(response_id(&mut s)?, 1);
    b.proxy.set_mode(Mode::Blackhole);
    s.set_read_timeout(Some(Duration::from_millis(1500)))?;
    s.write_all(&api_versions(2))?;
    let k = response_id(&mut s)
        .expect_err("no answer in a blackhole")
        .kind();
    assert!(
        is_timeout(k),
        "the read times out, the connection stays: {k:?}"
    );
    b.proxy.set_mode(Mode::Pass);
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    assert_eq!(response_id(&mut s)?, 2);

    // Our client, with every address learnt: a produce does not complete while blackholed.
    let cluster = Cluster::connect(b.settings()).await?;
    let producer = Arc::new(Producer::new(cluster, ProducerConfig::default()));
    let rec = |v: &'static str| OutRecord {
        value: Some(Bytes::from_static(v.as_bytes())),
        ..Default::default()
    };
    let first = producer.send(&topic, Some(0), rec("first")).await?;
    assert_eq!(first.wait().await?, 0);
    b.proxy.set_mode(Mode::Blackhole);
    let p = producer.clone();
    let t = topic.clone();
    let held =
        tokio::spawn(
            async move { anyhow::Ok(p.send(&t, Some(0), rec("held")).await?.wait().await?) },
        );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        !held.is_finished(),
        "a produce completed through a blackhole"
    );
    assert!(b.proxy.open() >= 1, "connections stay open");
    b.proxy.set_mode(Mode::Pass);
    let offset = tokio::time::timeout(Duration::from_secs(30), held)
        .await
        .context("the held produce did not complete after Pass")???;
    assert_eq!(offset, 1);
    let got = fx::read_topic(&b.bootstrap(), &topic, 2, 30)?;
    let values: Vec<&[u8]> = got.iter().map(|a| a.value.as_slice()).collect();
    assert_eq!(values, [&b"first"[..], b"held"]);
    producer.close(Duration::from_secs(5)).await?;
    Ok(())
}
