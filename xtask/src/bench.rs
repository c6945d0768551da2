//! `cargo xtask bench [--short]`: kafka-infer against the alternatives, on one broker and the
//! same data, on this machine. Every bridge is measured the same way:
//!
//! 1. fresh input/output topics (4 partitions); the bridge started;
//! 2. warm-up: 20 requests produced, their 20 answers awaited (group joins, connections);
//! 3. N requests produced at full speed; records/s = N / (first produce .. last answer);
//!    CPU seconds of the bridge's process tree from /proc; peak RSS (VmHWM).
//!
//! Latency: kafka-infer at a steady rate; each request carries its send time in a header that
//! kafka-infer copies to the answer, so the reader computes produce -> answer latency.
//! Direct model capacity: a load generator at kafka-infer's concurrency, REST and gRPC.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result, bail};
use bytes::{Buf, BufMut, Bytes};
use kafka_infer_tests as fx;
use kafka_io::{
    Cluster, Consumer, ConsumerConfig, GroupConfig, OutRecord, Producer, ProducerConfig,
};

const PARTITIONS: u32 = 4;
const MAX_IN_FLIGHT: usize = 16;
const CONCURRENCY: usize = PARTITIONS as usize * MAX_IN_FLIGHT;
/// kafka-infer flags of the batching rows: up to N records per model request, room for two
/// batches in flight per partition.
const BATCH_8: &[&str] = &["--batch-size", "8", "--max-in-flight", "16"];
const BATCH_32: &[&str] = &["--batch-size", "32", "--max-in-flight", "64"];

fn request(i: u64) -> Bytes {
    Bytes::from(format!(
        r#"{{"id":"r{i}","inputs":[{{"name":"x","shape":[4],"datatype":"FP32","data":[1.5,2.5,3.5,{i}]}}]}}"#
    ))
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// CPU seconds (user + system) of `pid` and its descendants, and the largest VmHWM among them.
fn usage(pid: u32) -> (f64, u64) {
    let mut cpu = 0.0;
    let mut hwm = 0;
    let mut stack = vec![pid];
    while let Some(p) = stack.pop() {
        if let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) {
            let after = stat.rsplit_once(')').map_or("", |(_, r)| r);
            let f: Vec<&str> = after.split_whitespace().collect();
            // Fields after the name: state is [0]; utime [11], stime [12] (clock ticks).
            let ticks: f64 = f.get(11).and_then(|x| x.parse().ok()).unwrap_or(0.0)
                + f.get(12).and_then(|x| x.parse().ok()).unwrap_or(0.0);
            cpu += ticks / 100.0;
        }
        if let Ok(status) = std::fs::read_to_string(format!("/proc/{p}/status")) {
            let kb: u64 = status
                .lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|x| x.parse().ok())
                .unwrap_or(0);
            hwm = hwm.max(kb * 1024);
        }
        if let Ok(kids) = std::fs::read_to_string(format!("/proc/{p}/task/{p}/children")) {
            stack.extend(
                kids.split_whitespace()
                    .filter_map(|x| x.parse::<u32>().ok()),
            );
        }
    }
    (cpu, hwm)
}

#[derive(Clone, Debug, Default)]
struct Figure {
    name: String,
    records: u64,
    per_s: f64,
    cpu_per_1000: f64,
    /// The broker's CPU seconds per 1000 answers in the same interval (producing the requests
    /// and reading the answers included, the same for every row).
    broker_cpu_per_1000: f64,
    rss_mib: f64,
    p50_ms: f64,
    p99_ms: f64,
    note: String,
}

fn pct(mut v: Vec<f64>, p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

struct Env {
    broker: fx::Broker,
    cluster: Arc<Cluster>,
    short: bool,
    release: PathBuf,
}

/// Reads answers from `topic` (a group of its own), recording latency from the `t0` header.
struct Reader {
    consumer: Consumer,
    latencies: Vec<f64>,
    seen: u64,
}

impl Reader {
    fn start(env: &Env, topic: &str) -> Self {
        let mut g = GroupConfig::new(fx::unique("bench-reader"), vec![topic.to_owned()]);
        g.session_timeout = Duration::from_secs(4);
        g.heartbeat_interval = Duration::from_millis(500);
        let mut c = ConsumerConfig::new(g);
        c.fetch_max_wait = Duration::from_millis(5);
        c.fetch_buffer_bytes = 256 << 20;
        Self {
            consumer: Consumer::start(env.cluster.clone(), c, None),
            latencies: Vec::new(),
            seen: 0,
        }
    }

    /// Waits until `total` answers were seen; returns when the last arrived.
    async fn until(&mut self, total: u64, within: Duration) -> Result<Instant> {
        let (last, seen) = self.until_or_stall(total, within, within).await?;
        if seen < total {
            bail!("{seen}/{total} answers within {within:?}");
        }
        Ok(last)
    }

    /// Like [`until`](Self::until), but gives up after `stall` without a new answer (a bridge
    /// that drops records never reaches `total`); returns the last answer's time and the count.
    async fn until_or_stall(
        &mut self,
        total: u64,
        within: Duration,
        stall: Duration,
    ) -> Result<(Instant, u64)> {
        let deadline = tokio::time::Instant::now() + within;
        let acker = self.consumer.acker();
        let mut last = Instant::now();
        while self.seen < total {
            let wait = deadline.min(tokio::time::Instant::from_std(last) + stall);
            let Ok(b) = tokio::time::timeout_at(wait, self.consumer.recv()).await else {
                break;
            };
            let b = b.context("reader closed")?;
            let now = now_ns();
            last = Instant::now();
            for r in &b.records {
                self.seen += 1;
                if let Some((_, t)) = r.headers.iter().find(|(k, _)| k == "t0") {
                    let t0: u64 = std::str::from_utf8(t)
                        .ok()
                        .and_then(|s| s.parse().ok())
                        .unwrap_or(now);
                    self.latencies.push(now.saturating_sub(t0) as f64 / 1e6);
                }
                acker.complete(&b.token(r.offset));
            }
        }
        Ok((last, self.seen))
    }
}

async fn produce(
    env: &Env,
    p: &Producer,
    topic: &str,
    range: std::ops::Range<u64>,
    rate: Option<f64>,
    extra: &[(String, Bytes)],
) -> Result<()> {
    let start = Instant::now();
    let mut deliveries = Vec::new();
    for i in range.clone() {
        if let Some(r) = rate {
            let due = start + Duration::from_secs_f64((i - range.start) as f64 / r);
            tokio::time::sleep_until(due.into()).await;
        }
        let mut headers = vec![("t0".to_string(), Bytes::from(now_ns().to_string()))];
        headers.extend(extra.iter().cloned());
        let rec = OutRecord {
            key: Some(Bytes::from(format!("k{}", i % 64))),
            value: Some(request(i)),
            headers,
        };
        deliveries.push(p.send(topic, None, rec).await?);
        if deliveries.len() >= 5000 {
            for d in deliveries.drain(..) {
                d.wait().await?;
            }
        }
    }
    for d in deliveries {
        d.wait().await?;
    }
    let _ = env;
    Ok(())
}

/// Measures one bridge: `start` gets (input, output) and returns its process.
async fn measure(
    env: &Env,
    name: &str,
    n: u64,
    extra: &[(String, Bytes)],
    start: impl FnOnce(&str, &str) -> Result<fx::Proc>,
) -> Result<Figure> {
    let (input, output) = (fx::unique("bin"), fx::unique("bout"));
    env.broker.create_topic(&input, PARTITIONS)?;
    env.broker.create_topic(&output, PARTITIONS)?;
    let proc = start(&input, &output)?;
    let pid = proc.pid();
    let p = Producer::new(env.cluster.clone(), ProducerConfig::default());
    let mut reader = Reader::start(env, &output);
    // Warm-up: the bridge has joined, connected, and answers.
    let warm = 20;
    let mut warmed = false;
    for _ in 0..10 {
        produce(env, &p, &input, 0..warm, None, extra).await?;
        if reader.until(warm, Duration::from_secs(30)).await.is_ok() {
            warmed = true;
            break;
        }
    }
    if !warmed {
        bail!("{name}: no answers to the warm-up");
    }
    let (cpu0, _) = usage(pid);
    let (bcpu0, _) = usage(env.broker.pid());
    reader.latencies.clear();
    let before = reader.seen;
    let t0 = Instant::now();
    produce(env, &p, &input, warm..warm + n, None, extra).await?;
    let within = Duration::from_secs(if env.short { 120 } else { 600 });
    let (last, seen) = reader
        .until_or_stall(before + n, within, Duration::from_secs(10))
        .await?;
    let answered = seen - before;
    let secs = last.duration_since(t0).as_secs_f64();
    let (cpu1, hwm) = usage(pid);
    let (bcpu1, _) = usage(env.broker.pid());
    drop(proc);
    reader.consumer.close().await;
    let f = Figure {
        name: name.into(),
        records: n,
        per_s: answered as f64 / secs,
        cpu_per_1000: (cpu1 - cpu0) / answered.max(1) as f64 * 1000.0,
        broker_cpu_per_1000: (bcpu1 - bcpu0) / answered.max(1) as f64 * 1000.0,
        rss_mib: hwm as f64 / (1024.0 * 1024.0),
        note: if answered < n {
            format!("{answered}: {} lost", n - answered)
        } else {
            "all".into()
        },
        ..Default::default()
    };
    eprintln!(
        "bench: {name}: {:.0} records/s, {:.3} CPU s/1000, broker {:.3} CPU s/1000, peak RSS {:.1} MiB, answered: {}",
        f.per_s, f.cpu_per_1000, f.broker_cpu_per_1000, f.rss_mib, f.note
    );
    Ok(f)
}

/// Produce -> answer latency through kafka-infer at a steady rate.
async fn latency(env: &Env, model_url: &str, rate: f64, seconds: f64) -> Result<Figure> {
    let (input, output) = (fx::unique("lin"), fx::unique("lout"));
    env.broker.create_topic(&input, PARTITIONS)?;
    env.broker.create_topic(&output, PARTITIONS)?;
    let ki = kafka_infer(
        env,
        &input,
        &output,
        model_url,
        "rest",
        &["--fetch-max-wait", "5ms"],
    )?;
    let pid = ki.pid();
    let p = Producer::new(env.cluster.clone(), ProducerConfig::default());
    let mut reader = Reader::start(env, &output);
    produce(env, &p, &input, 0..20, None, &[]).await?;
    reader.until(20, Duration::from_secs(60)).await?;
    reader.latencies.clear();
    let n = (rate * seconds) as u64;
    let (cpu0, _) = usage(pid);
    let prod = produce(env, &p, &input, 20..20 + n, Some(rate), &[]);
    let read = reader.until(20 + n, Duration::from_secs_f64(seconds + 60.0));
    let (a, b) = tokio::join!(prod, read);
    a?;
    b?;
    let (cpu1, hwm) = usage(pid);
    let lat = std::mem::take(&mut reader.latencies);
    // Latency over the run, by quarter (a growing trend points at the broker's storage).
    let q: Vec<String> = lat
        .chunks((lat.len() / 4).max(1))
        .map(|c| format!("{:.1}", pct(c.to_vec(), 0.5)))
        .collect();
    eprintln!(
        "bench: latency p50 by quarter of the run (ms): {}",
        q.join(", ")
    );
    reader.consumer.close().await;
    drop(ki);
    let f = Figure {
        name: format!("kafka-infer -> echo REST at {rate:.0} records/s"),
        records: n,
        per_s: rate,
        cpu_per_1000: (cpu1 - cpu0) / n as f64 * 1000.0,
        rss_mib: hwm as f64 / (1024.0 * 1024.0),
        p50_ms: pct(lat.clone(), 0.5),
        p99_ms: pct(lat, 0.99),
        note: String::new(),
        ..Default::default()
    };
    eprintln!(
        "bench: latency at {rate:.0}/s: p50 {:.2} ms, p99 {:.2} ms",
        f.p50_ms, f.p99_ms
    );
    Ok(f)
}

fn kafka_infer(
    env: &Env,
    input: &str,
    output: &str,
    url: &str,
    transport: &str,
    extra: &[&str],
) -> Result<fx::Proc> {
    // BENCH_KAFKA_INFER_BIN measures another build (e.g. target/dist/kafka-infer, the static one).
    let bin = std::env::var_os("BENCH_KAFKA_INFER_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| env.release.join("kafka-infer"));
    kafka_infer_bin(env, &bin, input, output, url, transport, extra)
}

/// The static build users run (`cargo xtask dist`), when it is there (said with its age: an
/// old one measures old code).
fn dist_binary() -> Option<PathBuf> {
    let p = fx::repo_root().join("target/dist/kafka-infer");
    let age = std::fs::metadata(&p)
        .ok()?
        .modified()
        .ok()?
        .elapsed()
        .ok()?;
    eprintln!(
        "bench: static build {} (built {} min ago)",
        p.display(),
        age.as_secs() / 60
    );
    Some(p)
}

fn kafka_infer_bin(
    env: &Env,
    bin: &Path,
    input: &str,
    output: &str,
    url: &str,
    transport: &str,
    extra: &[&str],
) -> Result<fx::Proc> {
    let metrics = fx::free_port();
    let mut cmd = Command::new(bin);
    cmd.args([
        "run",
        "--protocol",
        "v2",
        "--transport",
        transport,
        "--model",
        url,
        "--model-name",
        "echo",
    ])
    .args(["--group-id", &fx::unique("ki"), "--session-timeout", "4s"]);
    // Batching rows set their own window (records in flight per partition).
    if !extra.contains(&"--max-in-flight") {
        cmd.args(["--max-in-flight", &MAX_IN_FLIGHT.to_string()]);
    }
    cmd.args(["--metrics-addr", &format!("127.0.0.1:{metrics}")])
        .args(extra)
        // BENCH_KI_ARGS="--commit-interval 1ms ...": extra flags for kafka-infer (experiments).
        .args(
            std::env::var("BENCH_KI_ARGS")
                .unwrap_or_default()
                .split_whitespace(),
        )
        .env_clear()
        .env("KAFKA_BROKER", env.broker.bootstrap())
        .env("KAFKA_INPUT_TOPIC", input)
        .env("KAFKA_OUTPUT_TOPIC", output)
        // The test broker holds a Fetch until max-wait even when data arrives (the product's
        // 500ms default is for a real cluster); the bench's rows were measured at 20ms.
        .env("KAFKA_FETCH_MAX_WAIT", "20ms")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null());
    fx::Proc::spawn("kafka-infer", &mut cmd)
}

fn python_bridge(env: &Env, script: &str, args: &[&str]) -> Result<fx::Proc> {
    let mut cmd = Command::new(fx::python());
    cmd.arg(fx::repo_root().join("bench").join(script))
        .arg(env.broker.bootstrap())
        .args(args)
        .stdout(Stdio::null());
    fx::Proc::spawn(script, &mut cmd)
}

fn mlserver_echo(kafka: Option<(&Env, &str, &str)>) -> Result<fx::models::Server> {
    let (http_port, grpc_port, metrics_port) = (fx::free_port(), fx::free_port(), fx::free_port());
    let mut cmd = Command::new(fx::venv().join("bin/mlserver"));
    cmd.args(["start", "."])
        .current_dir(fx::repo_root().join("tests/models/mlserver-echo"))
        .env("MLSERVER_HTTP_PORT", http_port.to_string())
        .env("MLSERVER_GRPC_PORT", grpc_port.to_string())
        .env("MLSERVER_METRICS_PORT", metrics_port.to_string())
        .env("MLSERVER_PARALLEL_WORKERS", "0")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if let Some((env, input, output)) = kafka {
        cmd.env("MLSERVER_KAFKA_ENABLED", "true")
            .env("MLSERVER_KAFKA_SERVERS", env.broker.bootstrap())
            .env("MLSERVER_KAFKA_TOPIC_INPUT", input)
            .env("MLSERVER_KAFKA_TOPIC_OUTPUT", output);
    }
    let proc = fx::Proc::spawn("mlserver", &mut cmd)?;
    fx::wait_for(Duration::from_secs(90), "MLServer ready", || {
        matches!(
            fx::http_get(http_port, "/v2/models/echo/ready"),
            Ok((200, _))
        )
        .then_some(())
    })?;
    fx::wait_port(grpc_port, Duration::from_secs(30))?;
    Ok(fx::models::Server {
        proc,
        http_port,
        grpc_port,
    })
}

/// Direct capacity of a model server: `CONCURRENCY` clients calling as fast as they can.
async fn direct(name: &str, url: &str, grpc: bool, seconds: f64) -> Result<Figure> {
    use http_body_util::{BodyExt, Full};
    use hyper_util::{client::legacy::Client, rt::TokioExecutor};
    let count = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let mut tasks = Vec::new();
    if grpc {
        let client: Client<_, tonic::body::Body> = Client::builder(TokioExecutor::new())
            .http2_only(true)
            .build_http();
        let origin: http::Uri = url.parse()?;
        // The gRPC form of the same request, made once.
        let t = codec::Transcoder::default();
        let body = t.json_to_proto(
            codec::Protocol::V2,
            "inference.ModelInferRequest",
            &request(1),
            &codec::Hints {
                model_name: Some("echo".into()),
                ..Default::default()
            },
        )?;
        for _ in 0..CONCURRENCY {
            let mut g = tonic::client::Grpc::with_origin(client.clone(), origin.clone());
            let (count, errors, body) = (count.clone(), errors.clone(), body.clone());
            tasks.push(tokio::spawn(async move {
                while Instant::now() < deadline {
                    let ok = async {
                        g.ready().await.ok()?;
                        g.unary(
                            tonic::Request::new(body.clone()),
                            http::uri::PathAndQuery::from_static(
                                "/inference.GRPCInferenceService/ModelInfer",
                            ),
                            RawCodec,
                        )
                        .await
                        .ok()
                    }
                    .await
                    .is_some();
                    if ok { &count } else { &errors }.fetch_add(1, Ordering::Relaxed);
                }
            }));
        }
    } else {
        let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
        let target = format!("{url}/v2/models/echo/infer");
        for _ in 0..CONCURRENCY {
            let (client, target, count, errors) = (
                client.clone(),
                target.clone(),
                count.clone(),
                errors.clone(),
            );
            tasks.push(tokio::spawn(async move {
                while Instant::now() < deadline {
                    let req = http::Request::post(target.as_str())
                        .header("content-type", "application/json")
                        .body(Full::new(request(1)))
                        .expect("request");
                    let ok = match client.request(req).await {
                        Ok(r) => r.status().is_success() && r.into_body().collect().await.is_ok(),
                        Err(_) => false,
                    };
                    if ok { &count } else { &errors }.fetch_add(1, Ordering::Relaxed);
                }
            }));
        }
    }
    let t0 = Instant::now();
    for t in tasks {
        let _ = t.await;
    }
    let n = count.load(Ordering::Relaxed);
    let f = Figure {
        name: name.into(),
        records: n,
        per_s: n as f64 / t0.elapsed().as_secs_f64(),
        note: format!(
            "{CONCURRENCY} concurrent clients, {} errors",
            errors.load(Ordering::Relaxed)
        ),
        ..Default::default()
    };
    eprintln!("bench: {name}: {:.0} requests/s ({})", f.per_s, f.note);
    Ok(f)
}

#[derive(Clone, Copy, Default)]
struct RawCodec;
impl tonic::codec::Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawCodec;
    type Decoder = RawCodec;
    fn encoder(&mut self) -> Self {
        *self
    }
    fn decoder(&mut self) -> Self {
        *self
    }
}
impl tonic::codec::Encoder for RawCodec {
    type Item = Bytes;
    type Error = tonic::Status;
    fn encode(
        &mut self,
        item: Bytes,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        dst.put(item);
        Ok(())
    }
}
impl tonic::codec::Decoder for RawCodec {
    type Item = Bytes;
    type Error = tonic::Status;
    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<Bytes>, tonic::Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

pub fn bench(short: bool) -> Result<()> {
    let root = fx::repo_root();
    let status = Command::new(env!("CARGO"))
        .current_dir(&root)
        .args([
            "build",
            "--release",
            "--quiet",
            "-p",
            "runner",
            "-p",
            "kafka-infer-tests",
            "--bins",
        ])
        .status()?;
    if !status.success() {
        bail!("release build failed");
    }
    let release = root.join("target/release");
    // N per bridge; the one-call-at-a-time Python bridge gets fewer (it is ~100x slower).
    let (n, n_slow) = if short { (1_000, 100) } else { (20_000, 1_000) };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let figures = rt.block_on(async {
        let broker = fx::Broker::start()?;
        let cluster = Cluster::connect(broker.settings()).await?;
        let env = Env {
            broker,
            cluster,
            short,
            release: release.clone(),
        };
        let echo = {
            let (h, g) = (fx::free_port(), fx::free_port());
            let proc = fx::Proc::spawn(
                "echo model",
                Command::new(release.join("test-model")).args([
                    "--protocol",
                    "v2",
                    "--name",
                    "echo",
                    "--fn",
                    "echo",
                    "--http-port",
                    &h.to_string(),
                    "--grpc-port",
                    &g.to_string(),
                ]),
            )?;
            fx::wait_port(h, Duration::from_secs(10))?;
            fx::wait_port(g, Duration::from_secs(10))?;
            fx::models::Server {
                proc,
                http_port: h,
                grpc_port: g,
            }
        };
        let mut f: BTreeMap<&str, Figure> = BTreeMap::new();
        // BENCH_ONLY=ki_rest,a_copy runs just those (for profiling work); no report then.
        if let Ok(only) = std::env::var("BENCH_ONLY") {
            // d_* and e_* start MLServer (once, like the full run) on first use.
            let mut ml: Option<fx::models::Server> = None;
            let secs = if short { 3.0 } else { 15.0 };
            for k in only.split(',') {
                if ml.is_none() && (k.starts_with("d_") || k.starts_with("e_")) {
                    ml = Some(mlserver_echo(None)?);
                }
                let fig = match k {
                    "d_rest" | "d_grpc" | "d_grpc_b32" => {
                        let ml = ml.as_ref().expect("started above");
                        let (url, transport, extra, name) = match k {
                            "d_rest" => (
                                ml.rest_url(),
                                "rest",
                                &[][..],
                                "(d) kafka-infer -> MLServer, REST",
                            ),
                            "d_grpc" => (
                                ml.grpc_url(),
                                "grpc",
                                &[][..],
                                "(d) kafka-infer -> MLServer, gRPC",
                            ),
                            _ => (
                                ml.grpc_url(),
                                "grpc",
                                BATCH_32,
                                "(d) kafka-infer -> MLServer, gRPC, batch 32",
                            ),
                        };
                        measure(&env, name, n, &[], |i, o| {
                            kafka_infer(&env, i, o, &url, transport, extra)
                        })
                        .await?
                    }
                    "e_rest" => {
                        let ml = ml.as_ref().expect("started above");
                        direct("(e) MLServer direct, REST", &ml.rest_url(), false, secs).await?
                    }
                    "e_grpc" => {
                        let ml = ml.as_ref().expect("started above");
                        direct("(e) MLServer direct, gRPC", &ml.grpc_url(), true, secs).await?
                    }
                    "ki_rest" => {
                        measure(&env, "kafka-infer -> echo model, REST", n, &[], |i, o| {
                            kafka_infer(&env, i, o, &echo.rest_url(), "rest", &[])
                        })
                        .await?
                    }
                    "ki_grpc" => {
                        measure(&env, "kafka-infer -> echo model, gRPC", n, &[], |i, o| {
                            kafka_infer(&env, i, o, &echo.grpc_url(), "grpc", &[])
                        })
                        .await?
                    }
                    "ki_rest_b32" => {
                        measure(
                            &env,
                            "kafka-infer -> echo model, REST, batch 32",
                            n,
                            &[],
                            |i, o| kafka_infer(&env, i, o, &echo.rest_url(), "rest", BATCH_32),
                        )
                        .await?
                    }
                    "a_copy" => {
                        measure(&env, "(a) Python copy", n, &[], |i, o| {
                            python_bridge(&env, "copy.py", &[i, o, &fx::unique("copy")])
                        })
                        .await?
                    }
                    "latency" => {
                        latency(
                            &env,
                            &echo.rest_url(),
                            1000.0,
                            if short { 3.0 } else { 20.0 },
                        )
                        .await?
                    }
                    "ki_rest_static" => {
                        let bin = dist_binary()
                            .context("no target/dist/kafka-infer: cargo xtask dist")?;
                        measure(
                            &env,
                            "kafka-infer (static musl build) -> echo model, REST",
                            n,
                            &[],
                            |i, o| kafka_infer_bin(&env, &bin, i, o, &echo.rest_url(), "rest", &[]),
                        )
                        .await?
                    }
                    other => bail!("BENCH_ONLY: unknown item {other}"),
                };
                println!("{fig:?}");
            }
            return Ok(None); // guards stop the broker and models on the way out
        }
        let mh = vec![("mlserver-model".to_string(), Bytes::from_static(b"echo"))];
        f.insert(
            "ki_rest",
            measure(&env, "kafka-infer -> echo model, REST", n, &[], |i, o| {
                kafka_infer(&env, i, o, &echo.rest_url(), "rest", &[])
            })
            .await?,
        );
        // BENCH_BASELINE_BIN: another build (e.g. an older commit's) measured in the same run.
        if let Some(bin) = std::env::var_os("BENCH_BASELINE_BIN").map(PathBuf::from) {
            let label = std::env::var("BENCH_BASELINE_LABEL").unwrap_or_else(|_| "baseline".into());
            f.insert(
                "ki_rest_baseline",
                measure(
                    &env,
                    &format!("kafka-infer {label} build -> echo model, REST"),
                    n,
                    &[],
                    |i, o| kafka_infer_bin(&env, &bin, i, o, &echo.rest_url(), "rest", &[]),
                )
                .await?,
            );
        }
        // The static musl binary (its allocator is part of what it costs).
        if let Some(bin) = dist_binary() {
            f.insert(
                "ki_rest_static",
                measure(
                    &env,
                    "kafka-infer (static musl build) -> echo model, REST",
                    n,
                    &[],
                    |i, o| kafka_infer_bin(&env, &bin, i, o, &echo.rest_url(), "rest", &[]),
                )
                .await?,
            );
        }
        f.insert(
            "ki_grpc",
            measure(
                &env,
                "kafka-infer -> echo model, gRPC (JSON records transcoded)",
                n,
                &[],
                |i, o| kafka_infer(&env, i, o, &echo.grpc_url(), "grpc", &[]),
            )
            .await?,
        );
        for (key, name, extra) in [
            (
                "ki_rest_b8",
                "kafka-infer -> echo model, REST, batch 8",
                BATCH_8,
            ),
            (
                "ki_rest_b32",
                "kafka-infer -> echo model, REST, batch 32",
                BATCH_32,
            ),
        ] {
            f.insert(
                key,
                measure(&env, name, n, &[], |i, o| {
                    kafka_infer(&env, i, o, &echo.rest_url(), "rest", extra)
                })
                .await?,
            );
        }
        f.insert(
            "a_copy",
            measure(
                &env,
                "(a) Python consume->produce copy, no model call",
                n,
                &[],
                |i, o| python_bridge(&env, "copy.py", &[i, o, &fx::unique("copy")]),
            )
            .await?,
        );
        f.insert(
            "b_py",
            measure(
                &env,
                "(b) hand-written Python bridge -> echo model, REST",
                n_slow,
                &[],
                |i, o| {
                    python_bridge(
                        &env,
                        "bridge.py",
                        &[
                            i,
                            o,
                            &fx::unique("py"),
                            &format!("{}/v2/models/echo/infer", echo.rest_url()),
                        ],
                    )
                },
            )
            .await?,
        );
        // (c) MLServer's own Kafka server (it starts at `latest`: the warm-up covers that).
        let mut holder = None;
        let c = measure(
            &env,
            "(c) MLServer's Kafka server, echo model",
            n,
            &mh,
            |i, o| {
                let s = mlserver_echo(Some((&env, i, o)))?;
                let pid = s.proc.pid();
                holder = Some(s);
                Ok(fx::Proc::from_pid_owned_elsewhere("mlserver", pid))
            },
        )
        .await;
        drop(holder);
        f.insert("c_mlserver_kafka", c?);
        // (d) kafka-infer in front of MLServer, and (e) MLServer's direct capacity.
        let ml = mlserver_echo(None)?;
        let secs = if short { 3.0 } else { 15.0 };
        f.insert(
            "e_rest",
            direct("(e) MLServer direct, REST", &ml.rest_url(), false, secs).await?,
        );
        f.insert(
            "e_grpc",
            direct("(e) MLServer direct, gRPC", &ml.grpc_url(), true, secs).await?,
        );
        f.insert(
            "d_rest",
            measure(&env, "(d) kafka-infer -> MLServer, REST", n, &[], |i, o| {
                kafka_infer(&env, i, o, &ml.rest_url(), "rest", &[])
            })
            .await?,
        );
        f.insert(
            "d_grpc",
            measure(&env, "(d) kafka-infer -> MLServer, gRPC", n, &[], |i, o| {
                kafka_infer(&env, i, o, &ml.grpc_url(), "grpc", &[])
            })
            .await?,
        );
        for (key, name, transport, extra) in [
            (
                "d_rest_b8",
                "(d) kafka-infer -> MLServer, REST, batch 8",
                "rest",
                BATCH_8,
            ),
            (
                "d_rest_b32",
                "(d) kafka-infer -> MLServer, REST, batch 32",
                "rest",
                BATCH_32,
            ),
            (
                "d_grpc_b32",
                "(d) kafka-infer -> MLServer, gRPC, batch 32",
                "grpc",
                BATCH_32,
            ),
        ] {
            let url = if transport == "rest" {
                ml.rest_url()
            } else {
                ml.grpc_url()
            };
            f.insert(
                key,
                measure(&env, name, n, &[], |i, o| {
                    kafka_infer(&env, i, o, &url, transport, extra)
                })
                .await?,
            );
        }
        drop(ml);
        let lat = latency(
            &env,
            &echo.rest_url(),
            1000.0,
            if short { 3.0 } else { 20.0 },
        )
        .await?;
        Ok::<_, anyhow::Error>(Some((f, lat)))
    })?;
    match figures {
        Some((f, lat)) => report(&f, &lat, short),
        None => Ok(()),
    }
}

fn report(f: &BTreeMap<&str, Figure>, lat: &Figure, short: bool) -> Result<()> {
    let r = |a: &str, b: &str| f[a].per_s / f[b].per_s;
    let mut out = String::new();
    let cmd = if short {
        "cargo xtask bench --short"
    } else {
        "cargo xtask bench"
    };
    out.push_str(&format!(
        "# Benchmarks\n\nMade by `{cmd}` on this machine ({} cores), one run, test broker (tansu, memory storage), \
         small v2 requests (4 FP32 values), {} input partitions, kafka-infer `--max-in-flight {MAX_IN_FLIGHT}`.\n\n",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        PARTITIONS
    ));
    out.push_str("| bridge | requests | answered | answers/s | CPU s / 1000 answers | broker CPU s / 1000 | peak RSS MiB |\n|---|---:|---|---:|---:|---:|---:|\n");
    for k in [
        "ki_rest",
        "ki_rest_baseline",
        "ki_rest_static",
        "ki_rest_b8",
        "ki_rest_b32",
        "ki_grpc",
        "a_copy",
        "b_py",
        "c_mlserver_kafka",
        "d_rest",
        "d_rest_b8",
        "d_rest_b32",
        "d_grpc",
        "d_grpc_b32",
    ] {
        let Some(x) = f.get(k) else { continue };
        out.push_str(&format!(
            "| {} | {} | {} | {:.0} | {:.3} | {:.3} | {:.1} |\n",
            x.name, x.records, x.note, x.per_s, x.cpu_per_1000, x.broker_cpu_per_1000, x.rss_mib
        ));
    }
    out.push_str(
        "\n| direct model capacity | requests | requests/s | note |\n|---|---:|---:|---|\n",
    );
    for k in ["e_rest", "e_grpc"] {
        let x = &f[k];
        out.push_str(&format!(
            "| {} | {} | {:.0} | {} |\n",
            x.name, x.records, x.per_s, x.note
        ));
    }
    out.push_str(&format!(
        "\nLatency, produce -> answer, {}: p50 {:.2} ms, p99 {:.2} ms ({} records; kafka-infer CPU {:.3} s / 1000, peak RSS {:.1} MiB).\n",
        lat.name, lat.p50_ms, lat.p99_ms, lat.records, lat.cpu_per_1000, lat.rss_mib
    ));
    let peak = f
        .values()
        .filter(|x| x.name.starts_with("kafka-infer") || x.name.starts_with("(d)"))
        .map(|x| x.rss_mib)
        .fold(lat.rss_mib, f64::max);
    out.push_str(&format!(
        "\n| target | measured | met |\n|---|---|---|\n\
         | kafka-infer (echo) >= 1.0x plain copy (a) | {:.2}x | {} |\n\
         | kafka-infer (echo) >= 20x MLServer's Kafka server (c) | {:.1}x | {} |\n\
         | in front of MLServer, no batching, >= 0.95x its direct capacity (e), REST | {:.2}x | {} |\n\
         | in front of MLServer, no batching, >= 0.95x its direct capacity (e), gRPC | {:.2}x | {} |\n\
         | in front of MLServer > MLServer's Kafka server (c) | REST {:.1}x, gRPC {:.1}x | {} |\n\
         | p99 <= 30 ms at 1,000 records/s | {:.2} ms | {} |\n\
         | kafka-infer peak RSS <= 50 MiB | {:.1} MiB | {} |\n\
         | batching (32) in front of MLServer >= 5x its direct per-request capacity (e), REST | {:.2}x | {} |\n\
         | batching (32) in front of MLServer, gRPC, against (e) gRPC | {:.2}x | {} |\n\
         | echo answers per kafka-infer CPU second, batch 32 against batch 1 (REST) | {:.2}x | {} |\n",
        r("ki_rest", "a_copy"),
        yes(r("ki_rest", "a_copy") >= 1.0),
        r("ki_rest", "c_mlserver_kafka"),
        yes(r("ki_rest", "c_mlserver_kafka") >= 20.0),
        r("d_rest", "e_rest"),
        yes(r("d_rest", "e_rest") >= 0.95),
        r("d_grpc", "e_grpc"),
        yes(r("d_grpc", "e_grpc") >= 0.95),
        r("d_rest", "c_mlserver_kafka"),
        r("d_grpc", "c_mlserver_kafka"),
        yes(r("d_rest", "c_mlserver_kafka") > 1.0 && r("d_grpc", "c_mlserver_kafka") > 1.0),
        lat.p99_ms,
        yes(lat.p99_ms <= 30.0),
        peak,
        yes(peak <= 50.0),
        r("d_rest_b32", "e_rest"),
        yes(r("d_rest_b32", "e_rest") >= 5.0),
        r("d_grpc_b32", "e_grpc"),
        yes(r("d_grpc_b32", "e_grpc") >= 5.0),
        f["ki_rest"].cpu_per_1000 / f["ki_rest_b32"].cpu_per_1000,
        yes(f["ki_rest"].cpu_per_1000 / f["ki_rest_b32"].cpu_per_1000 >= 2.0),
    ));
    if let Some(b) = f.get("ki_rest_baseline") {
        let x = b.cpu_per_1000 / f["ki_rest_b32"].cpu_per_1000;
        out.push_str(&format!(
            "| echo answers per kafka-infer CPU second, batch 32 against the {} at batch 1 | {x:.2}x | {} |\n",
            b.name.trim_start_matches("kafka-infer ").trim_end_matches(" -> echo model, REST"),
            yes(x >= 2.0)
        ));
    }
    println!("{out}");
    let path = if short {
        fx::repo_root().join("target/benchmarks-short.md")
    } else {
        fx::repo_root().join("docs/benchmarks.md")
    };
    std::fs::create_dir_all(path.parent().expect("parent"))?;
    std::fs::write(&path, out)?;
    eprintln!("bench: written to {}", path.display());
    Ok(())
}

fn yes(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}
