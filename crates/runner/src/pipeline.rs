//! The bridge: records in, through the graph, results out, offsets committed.
//!
//! The dispatcher takes batches from the consumer and hands each record to its partition's
//! worker. A worker runs up to `max_in_flight` records concurrently but writes their results in
//! input order; once the broker acknowledges a result, the record is completed and the consumer
//! may commit past it. Every record ends as exactly one output or error record.

use std::{collections::HashMap, sync::Arc, time::Duration};

use bytes::Bytes;
use codec::{Payload, Pool, Protocol, Transcoder, detect};
use futures::{StreamExt, stream::FuturesOrdered, stream::FuturesUnordered};
use kafka_io::{
    Acker, Cluster, Consumer, ConsumerConfig, Delivery, GroupConfig, InRecord, OutRecord, Producer,
    ProducerConfig, Token,
};
use tokio::sync::{mpsc, watch};

use crate::{
    config::Config,
    graph::{CallError, Graph, Msg},
    metrics::Metrics,
};

pub const ERROR_HEADER: &str = "kafka-infer-error";
pub const ERROR_KIND_HEADER: &str = "kafka-infer-error-kind";

/// A partition worker: its assignment epoch and its queue of batches.
type Worker = (u64, mpsc::Sender<kafka_io::Batch>);

/// What processing one record produced.
enum Outcome {
    Answer(Msg),
    Failed(CallError),
    /// Shutdown interrupted it: no output, no completion (the next owner redoes it).
    Abandoned,
}

struct Ctx {
    graph: Graph,
    pool: Pool,
    protocol: Protocol,
    producer: Producer,
    output_topic: String,
    error_topic: Option<String>,
    max_in_flight: usize,
    metrics: Arc<Metrics>,
    acker: Acker,
    stop: watch::Receiver<bool>,
}

/// Runs until SIGTERM/SIGINT (or `stop` turns true), then drains, commits, leaves, returns.
pub async fn run(cfg: Config, mut stop: watch::Receiver<bool>) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::new());
    let _server = crate::metrics::serve(cfg.metrics_addr, metrics.clone()).await?;

    let mut pool = Pool::builtin();
    for p in &cfg.descriptor_sets {
        let bytes = std::fs::read(p)
            .map_err(|e| anyhow::anyhow!("--descriptor-set {}: {e}", p.display()))?;
        pool.add_descriptor_set(&bytes, &p.display().to_string())?;
    }

    let cluster = connect(&cfg, &mut stop).await?;
    let Some(cluster) = cluster else {
        return Ok(());
    };

    let mut group = GroupConfig::new(cfg.group_id.clone(), vec![cfg.input_topic.clone()]);
    group.session_timeout = cfg.session_timeout;
    group.heartbeat_interval = (cfg.session_timeout / 4).max(Duration::from_millis(100));
    group.rebalance_timeout = cfg.drain_timeout + cfg.session_timeout;
    let mut ccfg = ConsumerConfig::new(group);
    ccfg.auto_offset_reset = cfg.auto_offset_reset;
    ccfg.fetch_max_wait = cfg.fetch_max_wait;
    ccfg.drain_timeout = cfg.drain_timeout;
    ccfg.commit_interval = Duration::from_millis(500);
    let mut consumer = Consumer::start(cluster.clone(), ccfg, None);

    let graph = Graph::new(
        &cfg,
        Transcoder::new(pool.clone()),
        metrics.clone(),
        stop.clone(),
    )?;
    let ctx = Arc::new(Ctx {
        graph,
        pool,
        protocol: cfg.protocol,
        producer: Producer::new(
            cluster.clone(),
            ProducerConfig {
                compression: cfg.compression,
                ..Default::default()
            },
        ),
        output_topic: cfg.output_topic.clone(),
        error_topic: cfg.error_topic.clone(),
        max_in_flight: cfg.max_in_flight,
        metrics: metrics.clone(),
        acker: consumer.acker(),
        stop: stop.clone(),
    });

    tracing::info!(group = %cfg.group_id, input = %cfg.input_topic, output = %cfg.output_topic,
        protocol = %cfg.protocol, model = %cfg.graph.url, "kafka-infer running");

    let mut workers: HashMap<(Arc<str>, i32), Worker> = HashMap::new();
    let mut tasks = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut last_log = std::time::Instant::now();
    let mut last_ok = 0i64;
    loop {
        tokio::select! {
            batch = consumer.recv() => {
                let Some(batch) = batch else { break };
                let key = (batch.topic.clone(), batch.partition);
                let stale = workers.get(&key).is_none_or(|(epoch, _)| *epoch != batch.epoch);
                if stale {
                    // Two batches of slack per partition: a full partition does not hold up the others long.
                    let (tx, rx) = mpsc::channel(2);
                    tasks.push(tokio::spawn(partition_worker(ctx.clone(), batch.partition, rx)));
                    workers.insert(key.clone(), (batch.epoch, tx));
                }
                let tx = workers[&key].1.clone();
                // Waits while the worker holds two batches: the consumer's buffer fills and
                // fetching pauses. The batch stays in hand, so stopping can give it up.
                tokio::select! {
                    permit = tx.reserve() => match permit {
                        Ok(p) => p.send(batch),
                        Err(_) => abandon_batch(&ctx.acker, batch),
                    },
                    _ = stop.changed() => abandon_batch(&ctx.acker, batch),
                }
            }
            _ = tick.tick() => {
                let lag = consumer.lag();
                metrics.set_lag(&lag);
                metrics.ready.store(consumer.is_connected(), std::sync::atomic::Ordering::Relaxed);
                tasks.retain(|t: &tokio::task::JoinHandle<()>| !t.is_finished());
                if last_log.elapsed() >= Duration::from_secs(5) {
                    let ok = metrics.ok_total() as i64;
                    let rate = (ok - last_ok) as f64 / last_log.elapsed().as_secs_f64();
                    tracing::info!(records_per_s = format!("{rate:.1}"), total_lag = lag.iter().map(|l| l.lag).sum::<i64>(),
                        partitions = lag.len(), in_flight = consumer.in_flight(), "progress");
                    last_ok = ok;
                    last_log = std::time::Instant::now();
                }
            }
            _ = stop.changed() => break,
        }
        if *stop.borrow() {
            break;
        }
    }

    tracing::info!("stopping: no new records; finishing in-flight ones");
    metrics
        .ready
        .store(false, std::sync::atomic::Ordering::Relaxed);
    workers.clear(); // workers finish what they hold, then end
    consumer.begin_close(); // drains (waits for completions), commits, leaves the group
    let drain = async {
        for t in tasks {
            let _ = t.await;
        }
    };
    if tokio::time::timeout(cfg.drain_timeout, drain)
        .await
        .is_err()
    {
        tracing::warn!("drain timeout: some records stay uncommitted and will be redone");
    }
    consumer.closed().await;
    if let Err(e) = ctx.producer.close(Duration::from_secs(10)).await {
        tracing::warn!(error = %e, "producer flush on close");
    }
    tracing::info!("stopped cleanly");
    Ok(())
}

/// Connects, retrying while the cluster is unreachable; configuration errors end at once.
async fn connect(
    cfg: &Config,
    stop: &mut watch::Receiver<bool>,
) -> anyhow::Result<Option<Arc<Cluster>>> {
    let mut backoff = Duration::from_millis(500);
    loop {
        match Cluster::connect(cfg.connection.clone()).await {
            Ok(c) => return Ok(Some(c)),
            Err(e) if e.is_retryable() => {
                tracing::warn!(error = %e, retry_in = ?backoff, "cannot reach Kafka yet");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stop.changed() => return Ok(None),
                }
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
            Err(e) => return Err(e.into()),
        }
    }
}

async fn process(ctx: Arc<Ctx>, rec: &InRecord) -> Outcome {
    let payload = match detect(
        &ctx.pool,
        rec.value.clone().unwrap_or_default(),
        &rec.headers,
    ) {
        Ok(p) => p,
        Err(e) => return Outcome::Failed(e.into()),
    };
    let msg = match payload {
        Payload::Json(b) => Msg::Json(b),
        Payload::Proto { message, bytes } => Msg::Proto {
            name: message.full_name().to_owned().into(),
            bytes,
        },
    };
    match ctx.graph.infer(msg).await {
        Ok(m) => Outcome::Answer(m),
        Err(CallError::Stopped(_)) => Outcome::Abandoned,
        Err(e) => Outcome::Failed(e),
    }
}

/// Gives up every record of a batch that will not be processed (stopping, worker gone).
fn abandon_batch(acker: &Acker, b: kafka_io::Batch) {
    for r in &b.records {
        acker.abandon(&b.token(r.offset));
    }
}

async fn partition_worker(
    ctx: Arc<Ctx>,
    input_partition: i32,
    mut rx: mpsc::Receiver<kafka_io::Batch>,
) {
    let mut running = FuturesOrdered::new();
    let mut deliveries: FuturesUnordered<
        futures::future::BoxFuture<'static, (Token, Result<i64, kafka_io::Error>)>,
    > = FuturesUnordered::new();
    // Records received and not yet started, in offset order.
    let mut queue: std::collections::VecDeque<(InRecord, Token)> =
        std::collections::VecDeque::new();
    let mut open = true;
    loop {
        // Start what fits; once stopping, start nothing new and leave the rest for the next owner.
        let stopping = *ctx.stop.borrow();
        while running.len() < ctx.max_in_flight
            && let Some((rec, token)) = queue.pop_front()
        {
            if stopping {
                ctx.acker.abandon(&token);
                continue;
            }
            ctx.metrics.in_flight.inc();
            let c = ctx.clone();
            running.push_back(async move {
                let outcome = process(c, &rec).await;
                (rec, token, outcome)
            });
        }
        if stopping {
            for (_, token) in queue.drain(..) {
                ctx.acker.abandon(&token);
            }
        }
        tokio::select! {
            biased;
            Some((rec, token, outcome)) = running.next(), if !running.is_empty() => {
                ctx.metrics.in_flight.dec();
                match write_result(&ctx, input_partition, &rec, outcome).await {
                    Some(d) => deliveries.push(Box::pin(async move { (token, d.wait().await) })),
                    // Interrupted by shutdown: left uncommitted for the next owner.
                    None => ctx.acker.abandon(&token),
                }
            }
            Some((token, r)) = deliveries.next(), if !deliveries.is_empty() => {
                match r {
                    Ok(_) => ctx.acker.complete(&token),
                    Err(e) => tracing::error!(partition = token.partition, offset = token.offset, error = %e,
                        "result could not be written; the record stays uncommitted"),
                }
            }
            next = rx.recv(), if open && queue.len() < ctx.max_in_flight => {
                match next {
                    Some(b) => {
                        let (topic, partition, epoch) = (b.topic.clone(), b.partition, b.epoch);
                        queue.extend(b.records.into_iter().map(|r| {
                            let t = Token { topic: topic.clone(), partition, offset: r.offset, epoch };
                            (r, t)
                        }));
                    }
                    None => open = false,
                }
            }
            else => break,
        }
    }
}

fn copy_headers(rec: &InRecord) -> Vec<(String, Bytes)> {
    rec.headers
        .iter()
        .filter(|(k, _)| {
            !k.eq_ignore_ascii_case("proto-name")
                && !k.eq_ignore_ascii_case("content-type")
                && !k.eq_ignore_ascii_case(ERROR_HEADER)
                && !k.eq_ignore_ascii_case(ERROR_KIND_HEADER)
        })
        .cloned()
        .collect()
}

/// Queues the record's result (in order) and returns its delivery; None when abandoned.
async fn write_result(
    ctx: &Ctx,
    input_partition: i32,
    rec: &InRecord,
    outcome: Outcome,
) -> Option<Delivery> {
    let mut headers = copy_headers(rec);
    let (topic, value) = match outcome {
        Outcome::Abandoned => return None,
        Outcome::Answer(m) => {
            ctx.metrics.record("ok");
            let value = match m {
                Msg::Json(b) => {
                    headers.push((
                        "content-type".into(),
                        Bytes::from_static(b"application/json"),
                    ));
                    b
                }
                Msg::Proto { name, bytes } => {
                    headers.push(("proto-name".into(), Bytes::from(name.into_owned())));
                    bytes
                }
            };
            (ctx.output_topic.as_str(), value)
        }
        Outcome::Failed(e) => {
            ctx.metrics.record("error");
            tracing::warn!(partition = input_partition, offset = rec.offset, kind = e.kind(), error = %e, "record failed");
            headers.push((ERROR_HEADER.into(), Bytes::from(e.to_string())));
            headers.push((
                ERROR_KIND_HEADER.into(),
                Bytes::from_static(e.kind().as_bytes()),
            ));
            match &ctx.error_topic {
                // The error topic keeps the input as it was, for replay.
                Some(t) => {
                    for (k, v) in &rec.headers {
                        if k.eq_ignore_ascii_case("proto-name")
                            || k.eq_ignore_ascii_case("content-type")
                        {
                            headers.push((k.clone(), v.clone()));
                        }
                    }
                    (t.as_str(), rec.value.clone().unwrap_or_default())
                }
                None => {
                    let (value, proto) = error_body(ctx, rec, &e);
                    match proto {
                        Some(name) => {
                            headers.push(("proto-name".into(), Bytes::from_static(name.as_bytes())))
                        }
                        None => headers.push((
                            "content-type".into(),
                            Bytes::from_static(b"application/json"),
                        )),
                    }
                    (ctx.output_topic.as_str(), value)
                }
            }
        }
    };
    let partition = match &rec.key {
        Some(_) => None,
        None => match ctx.producer.partition_count(topic).await {
            Ok(n) => Some(input_partition % n.max(1)),
            Err(_) => Some(0),
        },
    };
    let out = OutRecord {
        key: rec.key.clone(),
        value: Some(value),
        headers,
    };
    // Retry queueing: it fails only when the topic's metadata cannot be read.
    let mut backoff = Duration::from_millis(100);
    loop {
        match ctx.producer.send(topic, partition, out.clone()).await {
            Ok(d) => return Some(d),
            Err(e) => {
                tracing::warn!(%topic, error = %e, "cannot queue result, retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// A protocol-shaped error answer (for the output topic when there is no error topic).
fn error_body(ctx: &Ctx, rec: &InRecord, e: &CallError) -> (Bytes, Option<&'static str>) {
    let status = match e {
        CallError::Model(m) => m.status(),
        _ => 400,
    };
    let was_proto = rec
        .headers
        .iter()
        .any(|(k, _)| k.eq_ignore_ascii_case("proto-name"));
    match ctx.protocol {
        Protocol::Seldon => {
            let v = serde_json::json!({"status": {"code": status, "info": e.to_string(), "reason": e.kind(), "status": "FAILURE"}});
            if was_proto
                && let Ok(b) = ctx
                    .graph
                    .transcoder()
                    .from_proto_json("seldon.protos.SeldonMessage", v.clone())
            {
                return (b, Some("seldon.protos.SeldonMessage"));
            }
            (Bytes::from(serde_json::to_vec(&v).expect("json")), None)
        }
        Protocol::Tensorflow | Protocol::V2 => {
            let v = serde_json::json!({"error": e.to_string()});
            (Bytes::from(serde_json::to_vec(&v).expect("json")), None)
        }
    }
}
