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
//!
//! Broker cost (BENCH_ONLY item `broker_cost`, issue 17): Kafka requests by API key (counted by
//! a proxy) and broker CPU, kafka-infer against librdkafka, idle on 16 partitions and at a
//! steady 100 and 1,000 records/s; see [`broker_cost`].
//!
//! The producer (BENCH_ONLY item `producer`, issue 18): idempotent (the default), not
//! idempotent and `--exactly-once`, batch 1 and 32, echo model and MLServer, interleaved over
//! BENCH_ROUNDS rounds with the build before the issue (BENCH_BASELINE_BIN); see
//! [`producer_rounds`].

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
/// Issue 18: exactly-once (transactions, the default 100 ms window), batch 1 and 32.
const EXACTLY_ONCE: &[&str] = &["--exactly-once", "true"];
const BATCH_32_EXACTLY_ONCE: &[&str] = &[
    "--batch-size",
    "32",
    "--max-in-flight",
    "64",
    "--exactly-once",
    "true",
];
/// Issue 18: the same rows with the producer not idempotent (the default is idempotent).
const NO_IDEMPOTENCE: &[&str] = &["--idempotence", "false"];
const BATCH_32_NO_IDEMPOTENCE: &[&str] = &[
    "--batch-size",
    "32",
    "--max-in-flight",
    "64",
    "--idempotence",
    "false",
];

/// Issue 18's rows: the producer idempotent (the default), not idempotent, and exactly-once, at
/// batch 1 and 32, in front of the echo model and MLServer (REST): key, name, in front of
/// MLServer, kafka-infer flags. In the full run, and (with the build before issue 18 when
/// BENCH_BASELINE_BIN is set) interleaved over rounds by the BENCH_ONLY item `producer`.
type ProducerRow = (&'static str, &'static str, bool, &'static [&'static str]);
const PRODUCER_ROWS: &[ProducerRow] = &[
    ("ki_rest", "kafka-infer -> echo model, REST", false, &[]),
    (
        "ki_rest_noidem",
        "kafka-infer, producer not idempotent -> echo model, REST",
        false,
        NO_IDEMPOTENCE,
    ),
    (
        "ki_rest_eos",
        "kafka-infer --exactly-once -> echo model, REST",
        false,
        EXACTLY_ONCE,
    ),
    (
        "ki_rest_b32",
        "kafka-infer -> echo model, REST, batch 32",
        false,
        BATCH_32,
    ),
    (
        "ki_rest_b32_noidem",
        "kafka-infer, producer not idempotent -> echo model, REST, batch 32",
        false,
        BATCH_32_NO_IDEMPOTENCE,
    ),
    (
        "ki_rest_b32_eos",
        "kafka-infer --exactly-once -> echo model, REST, batch 32",
        false,
        BATCH_32_EXACTLY_ONCE,
    ),
    ("d_rest", "(d) kafka-infer -> MLServer, REST", true, &[]),
    (
        "d_rest_noidem",
        "(d) kafka-infer, producer not idempotent -> MLServer, REST",
        true,
        NO_IDEMPOTENCE,
    ),
    (
        "d_rest_eos",
        "(d) kafka-infer --exactly-once -> MLServer, REST",
        true,
        EXACTLY_ONCE,
    ),
    (
        "d_rest_b32",
        "(d) kafka-infer -> MLServer, REST, batch 32",
        true,
        BATCH_32,
    ),
    (
        "d_rest_b32_noidem",
        "(d) kafka-infer, producer not idempotent -> MLServer, REST, batch 32",
        true,
        BATCH_32_NO_IDEMPOTENCE,
    ),
    (
        "d_rest_b32_eos",
        "(d) kafka-infer --exactly-once -> MLServer, REST, batch 32",
        true,
        BATCH_32_EXACTLY_ONCE,
    ),
];

/// Issue 18's targets from answers/s by key (rows that were not measured are left out):
/// idempotence costs <= 5%, exactly-once at batch 32 >= 0.5x at-least-once, and the default path
/// no slower than the build before the issue (>= 0.95x: one run's noise).
fn producer_targets(per_s: &BTreeMap<&str, f64>) -> String {
    let mut out = String::new();
    let mut row = |what: String, a: &str, b: &str, min: f64| {
        if let (Some(x), Some(y)) = (per_s.get(a), per_s.get(b)) {
            let r = x / y;
            out.push_str(&format!("| {what} | {r:.2}x | {} |\n", yes(r >= min)));
        }
    };
    for (model, p) in [("echo model", "ki_rest"), ("MLServer", "d_rest")] {
        for (batch, b) in [("batch 1", ""), ("batch 32", "_b32")] {
            row(
                format!(
                    "idempotent producer (the default) >= 0.95x not idempotent, {model}, REST, {batch}"
                ),
                &format!("{p}{b}"),
                &format!("{p}{b}_noidem"),
                0.95,
            );
        }
        row(
            format!("exactly-once at batch 32 >= 0.5x at-least-once at batch 32, {model}, REST"),
            &format!("{p}_b32_eos"),
            &format!("{p}_b32"),
            0.5,
        );
    }
    row(
        "the default path (echo model, REST) no slower than the build before issue 18 (>= 0.95x)"
            .into(),
        "ki_rest",
        "ki_rest_baseline",
        0.95,
    );
    out
}

/// One of [`PRODUCER_ROWS`]: kafka-infer over REST in front of the echo model or MLServer.
async fn producer_row(
    env: &Env,
    n: u64,
    row: &ProducerRow,
    echo: &str,
    ml: &str,
) -> Result<Figure> {
    let &(_, name, on_ml, extra) = row;
    let url = if on_ml { ml } else { echo };
    measure(env, name, n, &[], |i, o| {
        kafka_infer(env, i, o, url, "rest", extra)
    })
    .await
}

/// The BENCH_ONLY item `producer`: every row of [`PRODUCER_ROWS`] (and the build before issue
/// 18 when BENCH_BASELINE_BIN is set) measured in turn, BENCH_ROUNDS times (default 3), so each
/// ratio compares rows of the same rounds; the medians and issue 18's targets.
async fn producer_rounds(env: &Env, n: u64, echo: &str, ml: &str) -> Result<String> {
    let rounds: usize = std::env::var("BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3)
        .clamp(1, 9);
    let baseline = std::env::var_os("BENCH_BASELINE_BIN").map(PathBuf::from);
    let label = std::env::var("BENCH_BASELINE_LABEL").unwrap_or_else(|_| "baseline".into());
    let baseline_name = format!("kafka-infer {label} build -> echo model, REST");
    let mut all: BTreeMap<&str, Vec<Figure>> = BTreeMap::new();
    for round in 1..=rounds {
        for row in PRODUCER_ROWS {
            let key = row.0;
            let fig = producer_row(env, n, row, echo, ml).await?;
            eprintln!(
                "bench: producer round {round}: {key} {:.0} answers/s",
                fig.per_s
            );
            all.entry(key).or_default().push(fig);
        }
        if let Some(bin) = &baseline {
            let fig = measure(env, &baseline_name, n, &[], |i, o| {
                kafka_infer_bin(env, bin, i, o, echo, "rest", &[])
            })
            .await?;
            eprintln!(
                "bench: producer round {round}: baseline {:.0} answers/s",
                fig.per_s
            );
            all.entry("ki_rest_baseline").or_default().push(fig);
        }
    }
    let median = |v: &[Figure], f: fn(&Figure) -> f64| {
        let mut x: Vec<f64> = v.iter().map(f).collect();
        x.sort_by(f64::total_cmp);
        x[x.len() / 2]
    };
    let mut out = format!(
        "Made by `BENCH_ONLY=producer cargo xtask bench`: {rounds} rounds, each row once per round in \
         this order; medians. {n} requests per row, {PARTITIONS} input partitions.\n\n\
         | bridge | answers/s (median) | each round | CPU s / 1000 answers (median) |\n|---|---:|---|---:|\n"
    );
    let mut per_s = BTreeMap::new();
    let keys = PRODUCER_ROWS
        .iter()
        .map(|r| r.0)
        .chain(std::iter::once("ki_rest_baseline"));
    for key in keys {
        let Some(figs) = all.get(key) else { continue };
        let m = median(figs, |f| f.per_s);
        per_s.insert(key, m);
        let each: Vec<String> = figs.iter().map(|f| format!("{:.0}", f.per_s)).collect();
        out.push_str(&format!(
            "| {} | {m:.0} | {} | {:.3} |\n",
            figs[0].name,
            each.join(", "),
            median(figs, |f| f.cpu_per_1000)
        ));
    }
    out.push_str("\n| target (medians) | measured | met |\n|---|---|---|\n");
    out.push_str(&producer_targets(&per_s));
    Ok(out)
}

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
    /// What the bridges bootstrap from: the broker, or the counting proxy before it.
    bootstrap: String,
}

/// Reads answers from `topic` (a group of its own), recording latency from the `t0` header.
struct Reader {
    consumer: Consumer,
    latencies: Vec<f64>,
    seen: u64,
}

impl Reader {
    fn start(env: &Env, topic: &str) -> Self {
        Self::start_waiting(env, topic, Duration::from_millis(5))
    }

    /// A reader whose fetches wait up to `fetch_max_wait` for data.
    fn start_waiting(env: &Env, topic: &str, fetch_max_wait: Duration) -> Self {
        let mut g = GroupConfig::new(fx::unique("bench-reader"), vec![topic.to_owned()]);
        g.session_timeout = Duration::from_secs(4);
        g.heartbeat_interval = Duration::from_millis(500);
        let mut c = ConsumerConfig::new(g);
        c.fetch_max_wait = fetch_max_wait;
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
        .env("KAFKA_BROKER", &env.bootstrap)
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
        .arg(&env.bootstrap)
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
            bootstrap: broker.bootstrap(),
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
        // BENCH_ONLY=ki_rest,a_copy runs just those (for profiling work); no report then
        // (`broker_cost` prints its section of the report).
        if let Ok(only) = std::env::var("BENCH_ONLY") {
            // d_* and e_* start MLServer (once, like the full run) on first use.
            let mut ml: Option<fx::models::Server> = None;
            let secs = if short { 3.0 } else { 15.0 };
            for k in only.split(',') {
                if k == "broker_cost" {
                    println!("{}", broker_cost(short, &release, &echo.rest_url()).await?);
                    continue;
                }
                if ml.is_none() && (k.starts_with("d_") || k.starts_with("e_")) {
                    ml = Some(mlserver_echo(None)?);
                }
                if k == "producer" {
                    if ml.is_none() {
                        ml = Some(mlserver_echo(None)?);
                    }
                    let ml = ml.as_ref().expect("started above");
                    println!(
                        "{}",
                        producer_rounds(&env, n, &echo.rest_url(), &ml.rest_url()).await?
                    );
                    continue;
                }
                if let Some(row) = PRODUCER_ROWS.iter().find(|r| r.0 == k) {
                    // d_* rows started MLServer above; the echo rows do not use it.
                    let ml_url = ml.as_ref().map(|m| m.rest_url()).unwrap_or_default();
                    let fig = producer_row(&env, n, row, &echo.rest_url(), &ml_url).await?;
                    println!("{fig:?}");
                    continue;
                }
                let fig = match k {
                    "d_grpc" | "d_grpc_b32" => {
                        let ml = ml.as_ref().expect("started above");
                        let (url, transport, extra, name) = match k {
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
                    "ki_rest_baseline" => {
                        let bin = std::env::var_os("BENCH_BASELINE_BIN")
                            .map(PathBuf::from)
                            .context("ki_rest_baseline needs BENCH_BASELINE_BIN")?;
                        measure(
                            &env,
                            "kafka-infer baseline build -> echo model, REST",
                            n,
                            &[],
                            |i, o| kafka_infer_bin(&env, &bin, i, o, &echo.rest_url(), "rest", &[]),
                        )
                        .await?
                    }
                    "ki_grpc" => {
                        measure(&env, "kafka-infer -> echo model, gRPC", n, &[], |i, o| {
                            kafka_infer(&env, i, o, &echo.grpc_url(), "grpc", &[])
                        })
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
        // The producer rows in front of the echo model (ki_rest, the default path, first).
        for row in PRODUCER_ROWS.iter().filter(|r| !r.2) {
            f.insert(
                row.0,
                producer_row(&env, n, row, &echo.rest_url(), "").await?,
            );
        }
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
        f.insert(
            "ki_rest_b8",
            measure(
                &env,
                "kafka-infer -> echo model, REST, batch 8",
                n,
                &[],
                |i, o| kafka_infer(&env, i, o, &echo.rest_url(), "rest", BATCH_8),
            )
            .await?,
        );
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
        // The producer rows in front of MLServer (d_rest, the default path, first).
        for row in PRODUCER_ROWS.iter().filter(|r| r.2) {
            f.insert(row.0, producer_row(&env, n, row, "", &ml.rest_url()).await?);
        }
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
        let cost = broker_cost(short, &release, &echo.rest_url()).await?;
        Ok::<_, anyhow::Error>(Some((f, lat, cost)))
    })?;
    match figures {
        Some((f, lat, cost)) => report(&f, &lat, &cost, short),
        None => Ok(()),
    }
}

fn report(f: &BTreeMap<&str, Figure>, lat: &Figure, cost: &str, short: bool) -> Result<()> {
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
        "ki_rest_noidem",
        "ki_rest_b32_noidem",
        "ki_rest_eos",
        "ki_rest_b32_eos",
        "ki_grpc",
        "a_copy",
        "b_py",
        "c_mlserver_kafka",
        "d_rest",
        "d_rest_b8",
        "d_rest_b32",
        "d_rest_noidem",
        "d_rest_b32_noidem",
        "d_rest_eos",
        "d_rest_b32_eos",
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
    let per_s: BTreeMap<&str, f64> = f.iter().map(|(k, x)| (*k, x.per_s)).collect();
    out.push_str(&producer_targets(&per_s));
    if let Some(b) = f.get("ki_rest_baseline") {
        let x = b.cpu_per_1000 / f["ki_rest_b32"].cpu_per_1000;
        out.push_str(&format!(
            "| echo answers per kafka-infer CPU second, batch 32 against the {} at batch 1 | {x:.2}x | {} |\n",
            b.name.trim_start_matches("kafka-infer ").trim_end_matches(" -> echo model, REST"),
            yes(x >= 2.0)
        ));
    }
    out.push_str(cost);
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

// Broker cost (issue 17): what a client costs the broker, kafka-infer against librdkafka.
//
// A broker of its own sits behind a counting proxy (127.0.0.1) and advertises the proxy's port,
// so every connection of every client goes through it. The proxy reads the start of every
// request frame (size, API key, version, correlation id, client id) on its way to the broker and
// counts requests by client id and API key. The bench's own clients (the paced producer and the
// answer reader) use the client id `LOAD_CLIENT`; every other request is the measured client's.

/// Partitions of the broker-cost rows' topics (input and output).
const COST_PARTITIONS: u32 = 16;
/// Client id of the bench's own clients in the broker-cost rows (not counted as the bridge's).
const LOAD_CLIENT: &str = "bench-load";
/// API keys counted apart (in this order); every other key is counted as "other".
const API_KEYS: [(i16, &str); 4] = [
    (1, "Fetch"),
    (0, "Produce"),
    (8, "OffsetCommit"),
    (12, "Heartbeat"),
];

/// Requests seen by the proxy, by (client id, API key).
type Counts = std::collections::HashMap<(String, i16), u64>;

/// Splits one connection's client -> broker bytes into Kafka request frames (a 4-byte size,
/// then the request header: 2-byte API key, 2-byte version, 4-byte correlation id, client id as
/// a 2-byte length and its bytes) and reports each frame's API key and client id.
#[derive(Default)]
struct FrameCounter {
    /// The start of the current frame, up to the end of its client id.
    head: Vec<u8>,
    /// Bytes of the current frame still to pass after its head.
    skip: usize,
}

impl FrameCounter {
    /// The frame's length (with its size field), once its size is known.
    fn frame_len(&self) -> Option<usize> {
        let h = self.head.get(..4)?;
        Some(4 + i32::from_be_bytes([h[0], h[1], h[2], h[3]]).max(0) as usize)
    }

    /// How many bytes of the frame's start `head` must hold to name the frame.
    fn head_len(&self) -> usize {
        let Some(frame) = self.frame_len() else {
            return 4;
        };
        let want = match self.head.get(12..14) {
            Some(l) => 14 + i16::from_be_bytes([l[0], l[1]]).max(0) as usize,
            None => 14,
        };
        want.min(frame)
    }

    fn feed(&mut self, mut data: &[u8], on: &mut impl FnMut(i16, &str)) {
        loop {
            if self.skip > 0 {
                if data.is_empty() {
                    return;
                }
                let n = self.skip.min(data.len());
                self.skip -= n;
                data = &data[n..];
                continue;
            }
            let want = self.head_len();
            if self.head.len() < want {
                if data.is_empty() {
                    return;
                }
                let n = (want - self.head.len()).min(data.len());
                self.head.extend_from_slice(&data[..n]);
                data = &data[n..];
                continue;
            }
            let h = &self.head;
            let key = h.get(4..6).map_or(-1, |k| i16::from_be_bytes([k[0], k[1]]));
            on(
                key,
                &String::from_utf8_lossy(h.get(14..).unwrap_or_default()),
            );
            self.skip = self.frame_len().unwrap_or(4) - self.head.len();
            self.head.clear();
        }
    }
}

/// A TCP proxy on 127.0.0.1 (a free port) before 127.0.0.1:`target` that counts request
/// frames (see [`FrameCounter`]). Runs on a thread of its own; dropping it stops the thread
/// (joined) and closes every connection.
struct CountingProxy {
    port: u16,
    counts: Arc<std::sync::Mutex<Counts>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl CountingProxy {
    fn start(target: u16) -> Result<Self> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let port = listener.local_addr()?.port();
        let counts = Arc::new(std::sync::Mutex::new(Counts::new()));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let c = counts.clone();
        let thread = std::thread::Builder::new()
            .name(format!("cproxy-{port}"))
            .spawn(move || {
                rt.block_on(async move {
                    let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
                        return;
                    };
                    let accept = async {
                        loop {
                            match listener.accept().await {
                                Ok((s, _)) => {
                                    tokio::spawn(count_connection(s, target, c.clone()));
                                }
                                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                            }
                        }
                    };
                    tokio::select! {
                        _ = stopped => {}
                        _ = accept => {}
                    }
                });
                // Dropping the runtime drops every connection task, closing its sockets.
                drop(rt);
            })?;
        Ok(Self {
            port,
            counts,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn counts(&self) -> Counts {
        self.counts.lock().expect("counts").clone()
    }
}

impl Drop for CountingProxy {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn count_connection(
    client: tokio::net::TcpStream,
    target: u16,
    counts: Arc<std::sync::Mutex<Counts>>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let connect = tokio::net::TcpStream::connect(("127.0.0.1", target));
    let Ok(Ok(mut upstream)) = tokio::time::timeout(Duration::from_secs(5), connect).await else {
        return;
    };
    let mut client = client;
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let (mut cr, mut cw) = client.split();
    let (mut ur, mut uw) = upstream.split();
    let to_broker = async {
        let mut frames = FrameCounter::default();
        let mut buf = vec![0u8; 64 * 1024];
        let mut seen = Vec::new();
        loop {
            let n = cr.read(&mut buf).await?;
            if n == 0 {
                return uw.shutdown().await;
            }
            frames.feed(&buf[..n], &mut |key, id| seen.push((id.to_owned(), key)));
            if !seen.is_empty() {
                let mut c = counts.lock().expect("counts");
                for k in seen.drain(..) {
                    *c.entry(k).or_default() += 1;
                }
            }
            uw.write_all(&buf[..n]).await?;
        }
    };
    let to_client = async {
        tokio::io::copy(&mut ur, &mut cw).await?;
        cw.shutdown().await
    };
    let _ = tokio::try_join!(to_broker, to_client);
}

/// The measured client's requests between two counts: by [`API_KEYS`], then all others.
fn requests(a: &Counts, b: &Counts) -> [u64; 5] {
    let mut out = [0; 5];
    for ((client, key), n) in b {
        if client == LOAD_CLIENT {
            continue;
        }
        let d = n - a.get(&(client.clone(), *key)).copied().unwrap_or(0);
        let i = API_KEYS.iter().position(|(k, _)| k == key).unwrap_or(4);
        out[i] += d;
    }
    out
}

/// Run time (ns) of every thread of `pid` (/proc/PID/task/TID/schedstat, first field).
fn thread_times(pid: u32) -> BTreeMap<u32, u64> {
    let mut out = BTreeMap::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for t in tasks.flatten() {
        let Some(tid) = t.file_name().to_str().and_then(|s| s.parse().ok()) else {
            continue;
        };
        if let Some(ns) = std::fs::read_to_string(t.path().join("schedstat"))
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse().ok())
        {
            out.insert(tid, ns);
        }
    }
    out
}

/// What the broker-cost rows read at the start and the end of a window.
struct Snap {
    at: Instant,
    counts: Counts,
    /// The broker's threads' run time (ns), and its CPU seconds by /proc/PID/stat (10 ms ticks).
    broker_threads: BTreeMap<u32, u64>,
    broker_ticks: f64,
    /// CPU seconds of the measured client's process tree.
    client_cpu: f64,
}

impl Snap {
    fn take(proxy: &CountingProxy, broker: u32, client: u32) -> Self {
        Self {
            at: Instant::now(),
            counts: proxy.counts(),
            broker_threads: thread_times(broker),
            broker_ticks: usage(broker).0,
            client_cpu: usage(client).0,
        }
    }

    /// The broker's CPU seconds since `a`: its threads' run time (ns precision) when every
    /// thread of `a` is still there, else from /proc/PID/stat (10 ms ticks).
    fn broker_cpu_since(&self, a: &Snap) -> f64 {
        let ticks = self.broker_ticks - a.broker_ticks;
        if a.broker_threads.is_empty()
            || a.broker_threads
                .keys()
                .any(|t| !self.broker_threads.contains_key(t))
        {
            return ticks;
        }
        let ns: u64 = self
            .broker_threads
            .iter()
            .map(|(t, ns)| ns - a.broker_threads.get(t).copied().unwrap_or(0))
            .sum();
        ns as f64 / 1e9
    }
}

#[derive(Clone, Debug, Default)]
struct CostRow {
    name: String,
    fetch_wait_ms: u64,
    /// Records/s produced; None: idle (nothing produced).
    rate: Option<f64>,
    secs: f64,
    answers: u64,
    /// The measured client's requests by [`API_KEYS`], then all other keys.
    requests: [u64; 5],
    broker_cpu_s: f64,
    client_cpu_s: f64,
}

impl CostRow {
    fn from_window(name: &str, wait_ms: u64, rate: Option<f64>, a: &Snap, b: &Snap) -> Self {
        let row = Self {
            name: name.into(),
            fetch_wait_ms: wait_ms,
            rate,
            secs: b.at.duration_since(a.at).as_secs_f64(),
            answers: 0,
            requests: requests(&a.counts, &b.counts),
            broker_cpu_s: b.broker_cpu_since(a),
            client_cpu_s: b.client_cpu - a.client_cpu,
        };
        eprintln!(
            "bench: broker cost: {name}, fetch wait {wait_ms} ms: {:.1} s, requests {:?}, broker CPU {:.3} s (by ticks {:.2} s), client CPU {:.2} s",
            row.secs,
            row.requests,
            row.broker_cpu_s,
            b.broker_ticks - a.broker_ticks,
            row.client_cpu_s
        );
        row
    }

    fn total(&self) -> u64 {
        self.requests.iter().sum()
    }

    /// Requests per 1000 answers, by [`API_KEYS`], other, total.
    fn per_1000(&self) -> Vec<f64> {
        let per = |n: u64| n as f64 / self.answers.max(1) as f64 * 1000.0;
        self.requests
            .iter()
            .map(|&n| per(n))
            .chain([per(self.total())])
            .collect()
    }

    /// Requests per second, by [`API_KEYS`], other, total.
    fn per_s(&self) -> Vec<f64> {
        self.requests
            .iter()
            .chain([&self.total()])
            .map(|&n| n as f64 / self.secs)
            .collect()
    }

    fn broker_cpu_pct(&self) -> f64 {
        self.broker_cpu_s / self.secs * 100.0
    }
}

/// Polls (every 100 ms, at most 60 s) until the measured client has sent a Fetch since `base`.
async fn until_fetching(proxy: &CountingProxy, base: &Counts, what: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while requests(base, &proxy.counts())[0] == 0 {
        if Instant::now() > deadline {
            bail!("{what}: no Fetch within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// One idle row: the client started on an empty input topic, measured over `secs` once it
/// fetches (and 2 s more, for its group and fetch loop to settle).
async fn cost_idle(
    env: &Env,
    proxy: &CountingProxy,
    name: &str,
    wait_ms: u64,
    secs: f64,
    start: impl FnOnce(&str, &str) -> Result<fx::Proc>,
) -> Result<CostRow> {
    let (input, output) = (fx::unique("cin"), fx::unique("cout"));
    env.broker.create_topic(&input, COST_PARTITIONS)?;
    env.broker.create_topic(&output, COST_PARTITIONS)?;
    let base = proxy.counts();
    let proc = start(&input, &output)?;
    until_fetching(proxy, &base, name).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let a = Snap::take(proxy, env.broker.pid(), proc.pid());
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    let b = Snap::take(proxy, env.broker.pid(), proc.pid());
    drop(proc);
    Ok(CostRow::from_window(name, wait_ms, None, &a, &b))
}

/// One row at a steady rate: once the client answers a warm-up of 20 records, `rate * secs`
/// records produced at `rate`; the window ends when the reader has every answer.
async fn cost_rate(
    env: &Env,
    proxy: &CountingProxy,
    name: &str,
    wait_ms: u64,
    rate: f64,
    secs: f64,
    start: impl FnOnce(&str, &str) -> Result<fx::Proc>,
) -> Result<CostRow> {
    let (input, output) = (fx::unique("cin"), fx::unique("cout"));
    env.broker.create_topic(&input, COST_PARTITIONS)?;
    env.broker.create_topic(&output, COST_PARTITIONS)?;
    let proc = start(&input, &output)?;
    let p = Producer::new(env.cluster.clone(), ProducerConfig::default());
    // The reader's fetches wait 100 ms: it costs the broker little, and the same in every row.
    let mut reader = Reader::start_waiting(env, &output, Duration::from_millis(100));
    let warm = 20;
    produce(env, &p, &input, 0..warm, None, &[]).await?;
    reader
        .until(warm, Duration::from_secs(60))
        .await
        .with_context(|| format!("{name}: warm-up"))?;
    let n = (rate * secs) as u64;
    let a = Snap::take(proxy, env.broker.pid(), proc.pid());
    let prod = produce(env, &p, &input, warm..warm + n, Some(rate), &[]);
    let read = reader.until(warm + n, Duration::from_secs_f64(secs + 60.0));
    let (x, y) = tokio::join!(prod, read);
    x?;
    y?;
    let b = Snap::take(proxy, env.broker.pid(), proc.pid());
    drop(proc);
    reader.consumer.close().await;
    let mut row = CostRow::from_window(name, wait_ms, Some(rate), &a, &b);
    row.answers = n;
    Ok(row)
}

/// A librdkafka group member (tests/py/rdkafka_copy.py): a consume -> produce copy to
/// `output`, or a consumer only when `output` is "-".
fn rdkafka_member(env: &Env, input: &str, output: &str, wait_ms: u64) -> Result<fx::Proc> {
    let mut cmd = Command::new(fx::python());
    cmd.arg(fx::repo_root().join("tests/py/rdkafka_copy.py"))
        .args([&env.bootstrap, input, output, &fx::unique("rdk")])
        .arg(wait_ms.to_string())
        .stdout(Stdio::null());
    fx::Proc::spawn("rdkafka_copy.py", &mut cmd)
}

/// The broker-cost rows (BENCH_ONLY item `broker_cost`); returns the report's section.
async fn broker_cost(short: bool, release: &Path, echo_url: &str) -> Result<String> {
    let began = Instant::now();
    let broker_port = fx::free_port();
    let proxy = CountingProxy::start(broker_port)?;
    let broker = fx::Broker::start_on(broker_port, proxy.port)?;
    let mut settings = kafka_io::ConnectionSettings::plaintext(&proxy.bootstrap())?;
    settings.client_id = LOAD_CLIENT.into();
    let env = Env {
        cluster: Cluster::connect(settings).await?,
        broker,
        short,
        release: release.to_path_buf(),
        bootstrap: proxy.bootstrap(),
    };
    // The product's and librdkafka's default fetch wait; the full run adds the bench's 20 ms.
    let waits: &[u64] = if short { &[500] } else { &[500, 20] };
    let (idle_secs, rate_secs) = if short { (5.0, 5.0) } else { (20.0, 20.0) };
    let e = &env;
    let ki = move |wait: u64| {
        let flag = format!("{wait}ms");
        move |i: &str, o: &str| kafka_infer(e, i, o, echo_url, "rest", &["--fetch-max-wait", &flag])
    };
    // The broker with no client at all (its own timers): what the idle rows are above.
    let alone = {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let a = Snap::take(&proxy, e.broker.pid(), 0);
        tokio::time::sleep(Duration::from_secs_f64(idle_secs)).await;
        let b = Snap::take(&proxy, e.broker.pid(), 0);
        CostRow::from_window("no client (the broker alone)", 0, None, &a, &b)
    };
    let mut idle = Vec::new();
    let mut rated = Vec::new();
    for &w in waits {
        idle.push(cost_idle(e, &proxy, "kafka-infer", w, idle_secs, ki(w)).await?);
        idle.push(
            cost_idle(e, &proxy, "librdkafka consumer", w, idle_secs, |i, _| {
                rdkafka_member(e, i, "-", w)
            })
            .await?,
        );
    }
    for &w in waits {
        for rate in [100.0, 1000.0] {
            rated.push(
                cost_rate(
                    e,
                    &proxy,
                    "kafka-infer -> echo model, REST",
                    w,
                    rate,
                    rate_secs,
                    ki(w),
                )
                .await?,
            );
            rated.push(
                cost_rate(
                    e,
                    &proxy,
                    "librdkafka consume -> produce copy",
                    w,
                    rate,
                    rate_secs,
                    |i, o| rdkafka_member(e, i, o, w),
                )
                .await?,
            );
        }
    }
    drop(env); // the broker stops, then the proxy
    drop(proxy);
    eprintln!(
        "bench: broker cost rows took {:.0} s",
        began.elapsed().as_secs_f64()
    );
    Ok(cost_section(&alone, &idle, &rated, short))
}

fn cost_section(alone: &CostRow, idle: &[CostRow], rated: &[CostRow], short: bool) -> String {
    let keys: Vec<&str> = API_KEYS.iter().map(|(_, k)| *k).collect();
    let mut out = format!(
        "\n## Broker cost (issue 17)\n\n\
         Made by `{}`: a broker of its own (tansu, memory storage) behind a counting TCP proxy that \
         reads the API key and client id of every request; input and output topics of \
         {COST_PARTITIONS} partitions; one group member, session timeout 4 s and heartbeat 1 s for \
         both (kafka-infer `--session-timeout 4s`, its heartbeat a quarter of that; librdkafka \
         `session.timeout.ms`, `heartbeat.interval.ms`); the same fetch max-wait for both (kafka-infer \
         `--fetch-max-wait`, librdkafka `fetch.wait.max.ms`); kafka-infer commits every 1 s \
         (`--commit-interval` default), librdkafka auto-commits every 5 s (its default); both \
         producers linger 5 ms. Requests are the measured client's only (the bench's paced \
         producer and answer reader are told apart by client id). Broker CPU is the broker \
         process's (its threads' run time): at a steady rate it includes producing the requests \
         and reading the answers (fetch wait 100 ms), the same in both rows.\n\n",
        if short {
            "cargo xtask bench --short"
        } else {
            "BENCH_ONLY=broker_cost cargo xtask bench"
        }
    );
    out.push_str(&format!(
        "| idle on {COST_PARTITIONS} partitions, nothing produced | fetch wait | window s | broker CPU % | {} | other/s | requests/s |\n|---|---:|---:|---:|{}---:|---:|\n",
        keys.iter().map(|k| format!("{k}/s")).collect::<Vec<_>>().join(" | "),
        "---:|".repeat(keys.len())
    ));
    for r in std::iter::once(alone).chain(idle) {
        out.push_str(&format!(
            "| {} | {} | {:.0} | {:.3} | {} |\n",
            r.name,
            if r.fetch_wait_ms == 0 {
                "-".to_string()
            } else {
                format!("{} ms", r.fetch_wait_ms)
            },
            r.secs,
            r.broker_cpu_pct(),
            r.per_s()
                .iter()
                .map(|x| format!("{x:.2}"))
                .collect::<Vec<_>>()
                .join(" | ")
        ));
    }
    out.push_str(&format!(
        "\n| steady rate, per 1000 answers | fetch wait | records/s | answers | {} | other | requests | broker CPU s | client CPU s |\n|---|---:|---:|---:|{}---:|---:|---:|---:|\n",
        keys.join(" | "),
        "---:|".repeat(keys.len())
    ));
    for r in rated {
        out.push_str(&format!(
            "| {} | {} ms | {:.0} | {} | {} | {:.3} | {:.3} |\n",
            r.name,
            r.fetch_wait_ms,
            r.rate.unwrap_or(0.0),
            r.answers,
            r.per_1000()
                .iter()
                .map(|x| format!("{x:.1}"))
                .collect::<Vec<_>>()
                .join(" | "),
            r.broker_cpu_s / r.answers.max(1) as f64 * 1000.0,
            r.client_cpu_s / r.answers.max(1) as f64 * 1000.0,
        ));
    }
    out.push_str("\n| target (issue 17) | measured | met |\n|---|---|---|\n");
    // Rows come in pairs: kafka-infer, then librdkafka, under the same conditions.
    for p in idle.chunks(2) {
        let [k, l] = p else { continue };
        let x = k.broker_cpu_s / l.broker_cpu_s;
        out.push_str(&format!(
            "| idle broker CPU, kafka-infer <= 1.5x the librdkafka consumer's, fetch wait {} ms | {:.3}% against {:.3}%: {x:.2}x (the broker alone: {:.3}%) | {} |\n",
            k.fetch_wait_ms,
            k.broker_cpu_pct(),
            l.broker_cpu_pct(),
            alone.broker_cpu_pct(),
            yes(x <= 1.5)
        ));
    }
    for p in rated.chunks(2) {
        let [k, l] = p else { continue };
        let (a, b) = (k.per_1000()[5], l.per_1000()[5]);
        out.push_str(&format!(
            "| requests per answer at {:.0}/s, kafka-infer <= 1.5x the librdkafka copy's, fetch wait {} ms | {:.1} against {:.1} per 1000: {:.2}x | {} |\n",
            k.rate.unwrap_or(0.0),
            k.fetch_wait_ms,
            a,
            b,
            a / b,
            yes(a / b <= 1.5)
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(key: i16, client: &str, body: usize) -> Vec<u8> {
        let mut f = Vec::new();
        let size = 2 + 2 + 4 + 2 + client.len() + body;
        f.extend_from_slice(&(size as i32).to_be_bytes());
        f.extend_from_slice(&key.to_be_bytes());
        f.extend_from_slice(&3i16.to_be_bytes());
        f.extend_from_slice(&7i32.to_be_bytes());
        f.extend_from_slice(&(client.len() as i16).to_be_bytes());
        f.extend_from_slice(client.as_bytes());
        f.extend(std::iter::repeat_n(0xAB, body));
        f
    }

    #[test]
    fn frames_are_counted_however_the_stream_is_cut() {
        let mut stream = Vec::new();
        let want = [
            (1, "kafka-infer", 300),
            (0, "bench-load", 0),
            (12, "", 5),
            (8, "x", 70_000),
        ];
        for (k, c, b) in want {
            stream.extend(frame(k, c, b));
        }
        for cut in [1, 2, 3, 5, 13, 14, 15, 1000, 1 << 20] {
            let mut fc = FrameCounter::default();
            let mut seen = Vec::new();
            for chunk in stream.chunks(cut) {
                fc.feed(chunk, &mut |k, c| seen.push((k, c.to_owned())));
            }
            let expect: Vec<(i16, String)> =
                want.iter().map(|(k, c, _)| (*k, c.to_string())).collect();
            assert_eq!(seen, expect, "chunks of {cut}");
            assert!(fc.head.is_empty() && fc.skip == 0);
        }
    }
}
