//! The bridge: records in, through the graph, results out, offsets committed.
//!
//! The dispatcher takes batches from the consumer and hands each record to its partition's
//! worker. A worker runs up to `max_in_flight` records concurrently but writes their results in
//! input order; once the broker acknowledges a result, the record is completed and the consumer
//! may commit past it. Every record ends as exactly one output or error record.

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use codec::{Payload, Pool, Protocol, Transcoder, detect};
use futures::{StreamExt, stream::FuturesOrdered, stream::FuturesUnordered};
use kafka_io::{
    Acker, Cluster, Consumer, ConsumerConfig, Delivery, GroupConfig, InRecord, OutRecord,
    PartitionStream, ProduceError, Producer, ProducerConfig, StreamState, Token, backoff::Backoff,
};
use tokio::sync::watch;

mod batcher;

use crate::{
    config::Config,
    graph::{CallError, Graph, Msg},
    meta::{HeaderPolicy, RecordMeta},
    metrics::Metrics,
};

pub const ERROR_HEADER: &str = "kafka-infer-error";
pub const ERROR_KIND_HEADER: &str = "kafka-infer-error-kind";

/// What processing one record produced.
enum Outcome {
    Answer(Msg, RecordMeta),
    Failed(CallError, Option<RecordMeta>),
    /// Older than --max-record-age when its turn came: not sent to the model.
    Expired(String, RecordMeta),
    /// Shutdown interrupted it: no output, no completion (the next owner redoes it).
    Abandoned,
}

struct Ctx {
    graph: Graph,
    /// Records merged into one model request at most (1: no batching).
    batch_size: usize,
    /// How long a partial batch may wait for more records while calls run.
    batch_linger: Duration,
    input_topic: String,
    forward: HeaderPolicy,
    pool: Pool,
    protocol: Protocol,
    producer: Arc<Producer>,
    output_topic: String,
    error_topic: Option<String>,
    max_in_flight: usize,
    max_uncommitted: usize,
    /// Partitions whose records wait for a model slot: the producer lingers longer meanwhile.
    pressure: Arc<AtomicUsize>,
    /// Batching across partitions (`--batch-size` above 1).
    batcher: Option<batcher::Batcher>,
    metrics: Arc<Metrics>,
    acker: Acker,
    stop: watch::Receiver<bool>,
    /// Stops the workers (on SIGTERM, or after a fatal error).
    stop_tx: watch::Sender<bool>,
    /// Set when a result can be written nowhere: the process stops and exits non-zero.
    fatal: watch::Sender<Option<String>>,
    /// --max-record-age.
    max_record_age: Option<Duration>,
    /// `run --until-caught-up`: each partition's end offset and whether it is reached.
    until: Option<Arc<Until>>,
    /// `--exactly-once`: the open transaction window.
    window: Option<Arc<Window>>,
}

/// `run --until-caught-up`: where each partition the member runs started, ends (read when it
/// was assigned) and is committed.
struct Until {
    connector: kafka_io::conn::Connector,
    parts: std::sync::Mutex<std::collections::HashMap<(String, i32), UntilProgress>>,
}

/// One partition's way to its end offset.
#[derive(Clone, Copy, Debug)]
struct UntilProgress {
    from: i64,
    /// None until read.
    end: Option<i64>,
    committed: i64,
}

impl UntilProgress {
    fn is_done(&self) -> bool {
        self.end.is_some_and(|e| self.committed >= e)
    }
}

impl Until {
    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<(String, i32), UntilProgress>> {
        self.parts.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set(&self, topic: &str, partition: i32, progress: Option<UntilProgress>) {
        let mut m = self.lock();
        match progress {
            Some(p) => {
                m.insert((topic.to_owned(), partition), p);
            }
            None => {
                m.remove(&(topic.to_owned(), partition));
            }
        }
    }

    fn is_done(&self, tp: &(String, i32)) -> bool {
        self.lock().get(tp).is_some_and(UntilProgress::is_done)
    }

    /// Records committed since the partitions' ends were read, and records to go to the ends.
    fn progress(&self) -> (i64, i64) {
        self.lock()
            .values()
            .filter_map(|p| {
                let end = p.end?;
                let done = (p.committed.min(end) - p.from).max(0);
                Some((done, (end - p.from).max(0)))
            })
            .fold((0, 0), |(a, b), (c, d)| (a + c, b + d))
    }

    /// The partition's end: its last stable offset (the group reads read_committed), read
    /// with one Fetch from `from` (ListOffsets latest is wrong on some brokers). Retried a
    /// few times; Err when it stays unreadable.
    async fn end_offset(&self, topic: &str, partition: i32, from: i64) -> anyhow::Result<i64> {
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(2));
        let mut last = None;
        for _ in 0..5 {
            match kafka_io::admin::peek(&self.connector, topic, partition, from).await {
                Ok(f) => return Ok(f.stable_end()),
                Err(e) => {
                    tracing::warn!(%topic, partition, error = %e, "cannot read the end offset yet");
                    last = Some(e);
                    tokio::time::sleep(backoff.next_wait()).await;
                }
            }
        }
        Err(anyhow::anyhow!(
            "{topic}/{partition}: cannot read the end offset: {}",
            last.map(|e| e.to_string()).unwrap_or_default()
        ))
    }
}

/// What `run --until-caught-up` did.
#[derive(Clone, Debug)]
pub struct Summary {
    /// Every partition reached its end offset (false: stopped by a signal first).
    pub caught_up: bool,
    /// Records answered (written to the output topic).
    pub answered: u64,
    /// Error records written (including expired ones).
    pub error_records: u64,
    /// Of them, records older than --max-record-age.
    pub expired: u64,
    pub duration: Duration,
}

impl Summary {
    pub fn records_per_s(&self) -> f64 {
        (self.answered + self.error_records) as f64 / self.duration.as_secs_f64().max(1e-9)
    }
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: {} answered, {} error records ({} expired), {:.1} s, {:.1} records/s",
            if self.caught_up {
                "caught up"
            } else {
                "stopped before catching up"
            },
            self.answered,
            self.error_records,
            self.expired,
            self.duration.as_secs_f64(),
            self.records_per_s()
        )
    }
}

/// The open transaction (`--exactly-once`). Results are queued under `gate` (read); a commit
/// or an abort holds it (write), so nothing joins a transaction while it ends. An abort makes
/// every stream that exists stale (`min_epoch`): their results are not sent any more (they are
/// redone by the partitions' next owner, after the rejoin the abort asks for).
struct Window {
    gate: tokio::sync::RwLock<()>,
    /// Records of an assignment epoch below this are from before the last abort.
    min_epoch: std::sync::atomic::AtomicU64,
    /// The consumer's positions and identity (set once the consumer runs).
    positions: std::sync::OnceLock<kafka_io::TxnPositions>,
    /// The longest a commit or abort waits for queued results to be acknowledged.
    flush_timeout: Duration,
    metrics: Arc<Metrics>,
}

impl Window {
    /// Aborts the open transaction (gate held by the caller): results of every existing
    /// stream are dropped from now on. Returns the abort's error, if any.
    async fn abort(&self, producer: &Producer, why: &str) -> Option<kafka_io::TxnError> {
        let epoch = self.positions.get().map_or(0, |p| p.epoch());
        if self.min_epoch.fetch_max(epoch + 1, Ordering::SeqCst) > epoch {
            // No stream since the last abort: nothing was queued or can be committed since.
            return None;
        }
        tracing::info!(%why, "exactly-once: aborting the open transaction");
        self.metrics.transaction("aborted");
        producer.abort_transaction(self.flush_timeout).await.err()
    }
}

/// Runs until SIGTERM/SIGINT (or `stop` turns true), then drains, commits, leaves, returns.
pub async fn run(cfg: Config, stop: watch::Receiver<bool>) -> anyhow::Result<()> {
    run_mode(cfg, stop, false).await.map(|_| ())
}

/// [`run`]; with `until_caught_up`, each assigned partition's end offset is read when it is
/// assigned and records are processed up to it; once every partition of the member's
/// assignment is committed up to its end (or the member has had none for a session
/// timeout), it drains, commits, leaves the group and returns what it did.
pub async fn run_mode(
    mut cfg: Config,
    mut stop: watch::Receiver<bool>,
    until_caught_up: bool,
) -> anyhow::Result<Summary> {
    let started = std::time::Instant::now();
    let metrics = Arc::new(Metrics::new());
    metrics
        .sasl_plaintext_credentials
        .set(i64::from(cfg.connection.sends_password_in_clear()));
    let _server = crate::metrics::serve(cfg.metrics_addr, metrics.clone()).await?;

    let mut pool = Pool::builtin();
    for p in &cfg.descriptor_sets {
        let bytes = std::fs::read(p)
            .map_err(|e| anyhow::anyhow!("--descriptor-set {}: {e}", p.display()))?;
        pool.add_descriptor_set(&bytes, &p.display().to_string())?;
    }

    // The TLS configuration, built once for every connection (reconnects included): the
    // client key PEM and its password are zeroed now rather than kept for the process's life.
    cfg.connection.build_tls()?;
    let cluster = connect(&cfg, &mut stop).await?;
    let Some(cluster) = cluster else {
        return Ok(summary(&metrics, started, false));
    };
    check_topics(&cluster, &cfg).await?;

    let mut group = GroupConfig::new(cfg.group_id.clone(), vec![cfg.input_topic.clone()]);
    group.session_timeout = cfg.session_timeout;
    group.heartbeat_interval = (cfg.session_timeout / 4).max(Duration::from_millis(100));
    group.rebalance_timeout = cfg.drain_timeout + cfg.session_timeout;
    group.assignors = cfg.assignors.clone();
    if cfg.exactly_once.is_some() && !cfg.idempotence {
        anyhow::bail!(
            "--exactly-once needs idempotence: remove --idempotence false (KAFKA_INFER_IDEMPOTENCE)"
        );
    }
    if cfg.exactly_once.is_some() {
        // An abort redoes every partition's open window: the eager protocol revokes them all
        // at each rebalance anyway (cooperative-sticky would gain nothing).
        group.assignors.retain(|a| !a.is_cooperative());
        if group.assignors.is_empty() {
            group.assignors = vec![kafka_io::assignor::Assignor::Range];
        }
        // KIP-447: a new owner waits for the previous owner's transaction to complete.
        group.require_stable = true;
    }
    let pressure = Arc::new(AtomicUsize::new(0));
    let mut ccfg = ConsumerConfig::new(group);
    ccfg.auto_offset_reset = cfg.auto_offset_reset;
    ccfg.fetch_max_wait = cfg.fetch_max_wait;
    ccfg.fetch_buffer_bytes = cfg.fetch_buffer_bytes;
    ccfg.drain_timeout = cfg.drain_timeout;
    ccfg.commit_interval = cfg.commit_interval;
    ccfg.metadata_refresh = cfg.metadata_max_age;
    let producer = Producer::new(
        cluster.clone(),
        ProducerConfig {
            compression: cfg.compression,
            idempotent: cfg.idempotence,
            max_request_size: cfg.max_request_size,
            linger: cfg.linger,
            linger_max: cfg.linger_max,
            pressure: Some(pressure.clone()),
            transactional: cfg.exactly_once.as_ref().map(|e| {
                let mut t = kafka_io::TxnConfig::new(e.transactional_id.clone());
                t.retry_timeout = cfg.session_timeout.max(Duration::from_secs(5));
                t
            }),
            ..Default::default()
        },
    );
    let producer = Arc::new(producer);
    let window = cfg.exactly_once.as_ref().map(|e| {
        Arc::new(Window {
            gate: tokio::sync::RwLock::new(()),
            min_epoch: std::sync::atomic::AtomicU64::new(0),
            positions: std::sync::OnceLock::new(),
            flush_timeout: e.window.max(cfg.session_timeout),
            metrics: metrics.clone(),
        })
    });
    let on_revoke: Option<kafka_io::consumer::RevokeHook> = window.as_ref().map(|w| {
        ccfg.transactional_commits = true;
        let (w, producer) = (w.clone(), producer.clone());
        let hook: kafka_io::consumer::RevokeHook = Arc::new(move |tps| {
            let (w, producer) = (w.clone(), producer.clone());
            Box::pin(async move {
                let _g = w.gate.write().await;
                let why = format!("partitions revoked: {tps:?}");
                if let Some(e) = w.abort(&producer, &why).await {
                    tracing::warn!(error = %e, "exactly-once: abort on revoke failed (the next transaction's InitProducerId aborts it)");
                }
            })
        });
        hook
    });
    let mut consumer = Consumer::start(cluster.clone(), ccfg, on_revoke);
    if let Some(w) = &window {
        let _ = w.positions.set(consumer.transactions());
        tracing::info!(transactional_id = %cfg.exactly_once.as_ref().map(|e| e.transactional_id.as_str()).unwrap_or_default(),
            window = ?cfg.exactly_once.as_ref().map(|e| e.window), "exactly-once: answers and offsets committed in transactions");
    }

    let (fatal_tx, mut fatal_rx) = watch::channel(None::<String>);
    // The workers' stop: follows SIGTERM, and a fatal error sets it too.
    let (stop_tx, internal_stop) = watch::channel(*stop.borrow());
    {
        let (mut ext, tx) = (stop.clone(), stop_tx.clone());
        tokio::spawn(async move {
            while ext.changed().await.is_ok() {
                if *ext.borrow() {
                    let _ = tx.send(true);
                    return;
                }
            }
        });
    }
    let tracing = match (&cfg.otlp_endpoint, cfg.otlp) {
        (_, false) => None,
        (e, true) => Some(Arc::new(crate::otel::Tracing::start(
            e.as_deref(),
            &cfg.otel_service_name,
        )?)),
    };
    let graph = Graph::new(
        tracing,
        &cfg,
        Transcoder::new(pool.clone()).with_limits(codec::Limits::new(cfg.max_tensor_bytes)),
        metrics.clone(),
        internal_stop.clone(),
    )?;
    let (batcher_tx, batcher_rx) = match cfg.batch_size {
        0 | 1 => (None, None),
        _ => {
            let (tx, rx) = batcher::channel();
            (Some(tx), Some(rx))
        }
    };
    let ctx = Arc::new(Ctx {
        graph,
        batch_size: cfg.batch_size,
        batch_linger: cfg.batch_linger,
        input_topic: cfg.input_topic.clone(),
        forward: cfg.forward_headers.clone(),
        pool,
        protocol: cfg.protocol,
        producer: producer.clone(),
        output_topic: cfg.output_topic.clone(),
        error_topic: cfg.error_topic.clone(),
        max_in_flight: cfg.max_in_flight,
        max_uncommitted: cfg.max_uncommitted,
        pressure,
        batcher: batcher_tx,
        metrics: metrics.clone(),
        acker: consumer.acker(),
        stop: internal_stop,
        stop_tx,
        fatal: fatal_tx,
        max_record_age: cfg.max_record_age,
        until: until_caught_up.then(|| {
            Arc::new(Until {
                connector: cluster.connector.clone(),
                parts: Default::default(),
            })
        }),
        window: window.clone(),
    });
    let window_task = match (&window, &cfg.exactly_once) {
        (Some(w), Some(e)) => Some(tokio::spawn(window_loop(ctx.clone(), w.clone(), e.window))),
        _ => None,
    };

    if let Some(rx) = batcher_rx {
        tokio::spawn(batcher::run(ctx.clone(), rx));
    }

    tracing::info!(group = %cfg.group_id, input = %cfg.input_topic, output = %cfg.output_topic,
        protocol = %cfg.protocol, model = %crate::config::without_userinfo(&cfg.graph.url), "kafka-infer running");

    let mut tasks: Vec<tokio::task::JoinHandle<()>> = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let mut last_log = std::time::Instant::now();
    let mut last_ok = 0i64;
    // --until-caught-up: the first assignment (until then the member owns nothing yet), and
    // since when the member has owned nothing.
    let mut assignment = consumer.assignment();
    let mut joined = false;
    let mut empty_since: Option<std::time::Instant> = None;
    let mut caught_up = false;
    // Progress on a terminal (quiet when stderr is piped).
    let progress = until_caught_up && std::io::IsTerminal::is_terminal(&std::io::stderr());
    let mut last_progress = std::time::Instant::now();
    loop {
        tokio::select! {
            stream = consumer.next_stream() => {
                // One worker per assigned partition, for as long as it is ours.
                let Some(stream) = stream else { break };
                tasks.push(tokio::spawn(partition_worker(ctx.clone(), stream)));
            }
            _ = tick.tick() => {
                let lag = consumer.lag();
                metrics.set_lag(&lag);
                let stalled = consumer.stalled();
                metrics.stalled.set(stalled.len() as i64);
                metrics.fetch_buffer.set(consumer.budget().held() as i64);
                metrics.set_produce_throttled_ms(ctx.producer.throttled_ms());
                metrics.ready.store(consumer.is_connected() && stalled.is_empty(), std::sync::atomic::Ordering::Relaxed);
                metrics.model_bound.set(ctx.pressure.load(Ordering::Relaxed) as i64);
                tasks.retain(|t| !t.is_finished());
                crate::ratelog::flush_due();
                if let Some(until) = &ctx.until {
                    joined = joined || assignment.has_changed().unwrap_or(false);
                    let owned = assignment.borrow_and_update().clone();
                    if joined {
                        let done = if owned.is_empty() {
                            // A new member may get nothing for one cooperative round: wait
                            // for a session timeout before deciding there is nothing for it.
                            empty_since.get_or_insert_with(std::time::Instant::now).elapsed()
                                >= cfg.session_timeout
                        } else {
                            empty_since = None;
                            owned.iter().all(|tp| until.is_done(tp))
                        };
                        if done {
                            tracing::info!(partitions = owned.len(), "caught up: every assigned partition is committed up to its end offset");
                            caught_up = true;
                            let _ = ctx.stop_tx.send(true);
                            break;
                        }
                    }
                    if progress && last_progress.elapsed() >= Duration::from_secs(1) {
                        let (done, total) = until.progress();
                        eprint!("\r{done}/{total} records, {} partitions, {} answered, {} error records   ",
                            owned.len(), metrics.total("ok"), metrics.total("error") + metrics.total("expired"));
                        last_progress = std::time::Instant::now();
                    }
                }
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
            _ = fatal_rx.changed() => break,
        }
        if *stop.borrow() {
            break;
        }
    }
    let group_fatal = consumer.fatal_error();
    let fatal = fatal_rx.borrow().clone().or(group_fatal);
    if fatal.is_some() {
        // Workers start nothing new; what they hold is abandoned (redone after a restart).
        let _ = ctx.stop_tx.send(true);
    }

    if progress {
        eprintln!();
    }
    if let Some(w) = &window {
        // The open window is aborted: its input is redone after a restart.
        let _g = w.gate.write().await;
        if let Some(t) = window_task {
            t.abort();
        }
        if let Some(e) = w.abort(&ctx.producer, "shutdown").await {
            tracing::warn!(error = %e, "exactly-once: abort on shutdown failed (the next start's InitProducerId aborts it)");
        }
    }
    tracing::info!("stopping: no new records; finishing in-flight ones");
    metrics
        .ready
        .store(false, std::sync::atomic::Ordering::Relaxed);
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
    crate::ratelog::flush_all();
    if let Err(e) = ctx.producer.close(Duration::from_secs(10)).await {
        tracing::warn!(error = %e, "producer flush on close");
    }
    if let Some(t) = ctx.graph.tracing() {
        let t = t.clone();
        // The batch processor's shutdown blocks while it exports.
        let _ = tokio::task::spawn_blocking(move || t.shutdown()).await;
    }
    if let Some(why) = fatal {
        anyhow::bail!("stopped: {why}");
    }
    tracing::info!("stopped cleanly");
    Ok(summary(&metrics, started, caught_up))
}

fn summary(metrics: &Metrics, started: std::time::Instant, caught_up: bool) -> Summary {
    let expired = metrics.total("expired");
    Summary {
        caught_up,
        answered: metrics.total("ok"),
        error_records: metrics.total("error") + expired,
        expired,
        duration: started.elapsed(),
    }
}

/// `--exactly-once`: every `period`, the open transaction commits what was written in it with
/// the input positions those answers complete (TxnOffsetCommit with the member's generation);
/// a transaction that cannot commit is aborted and the member gives its partitions up and
/// rejoins (fenced included: the next transaction starts with a new producer epoch); a
/// transactional id the broker refuses stops the process.
async fn window_loop(ctx: Arc<Ctx>, w: Arc<Window>, period: Duration) {
    let Some(positions) = w.positions.get().cloned() else {
        return;
    };
    loop {
        // A whole window open after each commit (an interval would start the next commit at
        // once after a slow one, and the workers, queued behind it, would put one answer each
        // in every transaction).
        tokio::time::sleep(period).await;
        let _g = w.gate.write().await;
        let min_epoch = w.min_epoch.load(Ordering::SeqCst);
        // Flushed first: the acknowledged answers complete their records (in the writer), so
        // the positions read next cover exactly what this transaction holds.
        let flushed = ctx.producer.flush(w.flush_timeout).await;
        let offsets = positions.offsets(min_epoch);
        let result = match (&offsets, flushed) {
            (_, false) => Err(kafka_io::TxnError::Abortable(format!(
                "answers not acknowledged within {:?}",
                w.flush_timeout
            ))),
            // Not a member now: nothing may be committed; what was written is aborted.
            (None, true) => match ctx.producer.transaction_error().await {
                Some(e) => Err(e),
                None => Ok(false),
            },
            (Some(o), true) => {
                ctx.producer
                    .commit_transaction(Some(o), w.flush_timeout)
                    .await
            }
        };
        match result {
            Ok(true) => {
                if let Some(o) = &offsets {
                    positions.committed(o);
                    tracing::debug!(positions = ?o.positions, "exactly-once: transaction committed");
                }
                ctx.metrics.transaction("committed");
            }
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(error = %e, "exactly-once: the transaction cannot commit; aborting, giving the partitions up and rejoining");
                if let Some(e2) = w.abort(&ctx.producer, &e.to_string()).await {
                    tracing::warn!(error = %e2, "exactly-once: abort failed (the next transaction's InitProducerId aborts it)");
                }
                if matches!(e, kafka_io::TxnError::Unauthorized { .. }) {
                    fatal(&ctx, format!("exactly-once: {e}"));
                    return;
                }
                positions.rejoin();
            }
        }
    }
}

/// The output and error topics must exist: producing to a missing one would stall (or, on
/// brokers that auto-create, write where nobody reads).
async fn check_topics(cluster: &Cluster, cfg: &Config) -> anyhow::Result<()> {
    let mut topics = vec![cfg.output_topic.clone()];
    topics.extend(cfg.error_topic.clone());
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
    let mut attempts = 0;
    loop {
        match cluster.partition_counts(&topics).await {
            Ok(_) => return Ok(()),
            Err(kafka_io::Error::UnknownTopic(t)) => {
                let which = if t == cfg.output_topic {
                    "output topic (KAFKA_OUTPUT_TOPIC)"
                } else {
                    "error topic (KAFKA_ERROR_TOPIC)"
                };
                anyhow::bail!("the {which} `{t}` does not exist: create it, then start again")
            }
            Err(e) if attempts < 5 => {
                attempts += 1;
                tracing::warn!(error = %e, "cannot read topic metadata yet");
                tokio::time::sleep(backoff.next_wait()).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Connects, retrying while the cluster is unreachable; configuration errors end at once.
async fn connect(
    cfg: &Config,
    stop: &mut watch::Receiver<bool>,
) -> anyhow::Result<Option<Arc<Cluster>>> {
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(10));
    loop {
        match Cluster::connect(cfg.connection.clone()).await {
            Ok(c) => return Ok(Some(c)),
            // A wrong CA or client certificate does not fix itself: stop with the reason.
            Err(e) if e.is_certificate_problem() => return Err(e.into()),
            Err(e) if e.is_retryable() => {
                let wait = backoff.next_wait();
                tracing::warn!(error = %e, retry_in = ?wait, "cannot reach Kafka yet");
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = stop.changed() => return Ok(None),
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
}

impl Ctx {
    /// A record's context (request id, headers for the model, trace; its span when exported).
    /// `own_id`: a record without a request id gets one derived from where it was read (false:
    /// a batch's own call, which gets a new one).
    fn record_meta(
        &self,
        headers: &[(String, Bytes)],
        partition: i32,
        offset: i64,
        own_id: bool,
    ) -> RecordMeta {
        let mut rm = RecordMeta::of_record(
            headers,
            self.protocol,
            &self.forward,
            own_id.then_some((self.input_topic.as_str(), partition, offset)),
        );
        if let Some(t) = self.graph.tracing() {
            rm.trace_with(t, &self.input_topic, partition, offset);
        }
        rm
    }
}

async fn process(ctx: Arc<Ctx>, partition: i32, rec: &InRecord) -> Outcome {
    // First, so an error record for a bad payload carries the request id and trace too.
    let mut rm = ctx.record_meta(&rec.headers, partition, rec.offset, true);
    let payload = match detect(
        &ctx.pool,
        rec.value.clone().unwrap_or_default(),
        &rec.headers,
    ) {
        Ok(p) => p,
        Err(e) => {
            if let Some(s) = rm.span.as_mut() {
                s.failed(&printable(&e));
            }
            return Outcome::Failed(e.into(), Some(rm));
        }
    };
    let msg = match payload {
        Payload::Json(b) => Msg::Json(b),
        Payload::Proto { message, bytes } => Msg::Proto {
            name: message.full_name().to_owned().into(),
            bytes,
        },
    };
    match ctx.graph.infer(msg, &rm).await {
        Ok(m) => Outcome::Answer(m, rm),
        Err(CallError::Stopped(_)) => Outcome::Abandoned,
        Err(e) => {
            if let Some(s) = rm.span.as_mut() {
                s.failed(&printable(&e));
            }
            Outcome::Failed(e, Some(rm))
        }
    }
}

/// The worker of one partition stream: up to `max_in_flight` model calls at once, and up to
/// `max_uncommitted` records between the start of their model call and the commit of their
/// offset (so a crash redoes at most that many of this partition); results are written in
/// input order. On draining it starts nothing new and
/// finishes what it holds; on revoke it stops at once.
async fn partition_worker(ctx: Arc<Ctx>, mut stream: PartitionStream) {
    let input_partition = stream.partition;
    let mut state = stream.state();
    let mut committed = stream.committed();
    // Offsets whose result is acknowledged and not yet committed: they count against
    // `max_uncommitted`, so a crash redoes at most that many records of this partition.
    let mut acked: std::collections::VecDeque<i64> = std::collections::VecDeque::new();
    // Records running (alone or through the batcher), in input order.
    let mut running: FuturesOrdered<futures::future::BoxFuture<'static, Done>> =
        FuturesOrdered::new();
    let mut deliveries: FuturesUnordered<futures::future::BoxFuture<'static, Delivered>> =
        FuturesUnordered::new();
    // Records received and not yet started, in offset order.
    let mut queue: std::collections::VecDeque<Queued> = std::collections::VecDeque::new();
    let mut open = true;
    // The epoch of the last batch (a new one after an offset reset).
    let mut last_epoch: Option<u64> = None;
    let mut pressure = Pressure {
        count: ctx.pressure.clone(),
        on: false,
    };
    // Records received and not finished (offset -> Kafka timestamp): the first is the oldest
    // unprocessed one (kafka_infer_consumer_lag_seconds).
    let mut unfinished = Unfinished {
        topic: stream.topic.clone(),
        partition: input_partition,
        metrics: ctx.metrics.clone(),
        records: std::collections::BTreeMap::new(),
        published: None,
    };
    let _until_entry = UntilEntry(ctx.until.clone(), stream.topic.clone(), input_partition);
    // --until-caught-up: where this partition ends (read now, as it is assigned).
    let from = *committed.borrow();
    let end = match &ctx.until {
        None => None,
        Some(until) => {
            let mut p = UntilProgress {
                from,
                end: None,
                committed: from,
            };
            until.set(&stream.topic, input_partition, Some(p));
            let end = tokio::select! {
                e = until.end_offset(&stream.topic, input_partition, from) => e,
                _ = ctx.stop_changed() => return,
            };
            match end {
                Ok(e) => {
                    tracing::info!(topic = %stream.topic, partition = input_partition, from, end = e, "processing up to the end offset");
                    p.end = Some(e);
                    until.set(&stream.topic, input_partition, Some(p));
                    Some(e)
                }
                Err(e) => {
                    fatal(&ctx, e.to_string());
                    return;
                }
            }
        }
    };
    loop {
        unfinished.publish();
        if let (Some(e), Some(until)) = (end, &ctx.until) {
            let p = UntilProgress {
                from,
                end: Some(e),
                committed: *committed.borrow(),
            };
            until.set(&stream.topic, input_partition, Some(p));
        }
        let now = *state.borrow();
        if now == StreamState::Revoked {
            // Not ours any more: what is running is dropped; the new owner redoes it.
            for _ in 0..running.len() {
                ctx.metrics.in_flight.dec();
            }
            return;
        }
        // Start what fits; once stopping or draining, start nothing new and leave the rest.
        let stopping = *ctx.stop.borrow() || now == StreamState::Draining;
        if stopping {
            open = false;
            for q in queue.drain(..) {
                unfinished.remove(q.token.offset);
                ctx.acker.abandon(&q.token);
            }
        }
        {
            let c = *committed.borrow_and_update();
            while acked.front().is_some_and(|o| *o < c) {
                acked.pop_front();
            }
        }
        // Start what fits (a mergeable record goes to the batcher, which merges across
        // partitions and answers it here, so answers keep their order).
        loop {
            let held = running.len() + deliveries.len() + acked.len();
            let room = ctx
                .max_in_flight
                .saturating_sub(running.len())
                .min(ctx.max_uncommitted.saturating_sub(held));
            // The partition's records and answers being written fill its share of the fetch
            // buffer: wait for acknowledgements (unless nothing is out, e.g. one huge record).
            let full = stream.over_budget() && !(running.is_empty() && deliveries.is_empty());
            if room == 0 || full {
                if held >= ctx.max_uncommitted && !acked.is_empty() {
                    // Waiting for a commit: ask for it now, not within --commit-interval.
                    ctx.acker.urge_commit();
                }
                break;
            }
            let Some(mut q) = queue.pop_front() else {
                break;
            };
            if end.is_some_and(|e| q.rec.offset >= e) {
                // Past the end offset read at assignment: left for the next run.
                queue.push_front(q);
                break;
            }
            if let Some(max) = ctx.max_record_age
                && let Some(age) = record_age(&q.rec)
                && age > max
            {
                let rm = ctx.record_meta(&q.rec.headers, input_partition, q.rec.offset, true);
                let why = format!(
                    "the record is {} old when its turn comes, older than --max-record-age \
                     (KAFKA_INFER_MAX_RECORD_AGE) {}: not sent to the model",
                    humantime::format_duration(Duration::from_millis(age.as_millis() as u64)),
                    humantime::format_duration(max)
                );
                ctx.metrics.in_flight.inc();
                let done: Done = (q.rec, q.token, Outcome::Expired(why, rm));
                running.push_back(Box::pin(std::future::ready(done)));
                continue;
            }
            // Parsed now, not on arrival: a queue of fetched records pins only their bytes.
            if ctx.batch_size > 1 {
                q.part = batch_part(&ctx, &q.rec);
                // The parsed request counts against the partition's share of the fetch buffer.
                if let Some(p) = &q.part {
                    q.rec.charge.add(p.size());
                }
            }
            ctx.metrics.in_flight.inc();
            running.push_back(Box::pin(run_record(ctx.clone(), input_partition, q)));
        }
        // Records wait because every model slot is busy: the model sets the pace.
        pressure.set(!queue.is_empty() && running.len() >= ctx.max_in_flight);
        tokio::select! {
            biased;
            // The consumer is gone (closed): nothing of this partition can be committed any more.
            r = state.changed() => if r.is_err() { return; },
            // (--until-caught-up: also to see the end offset committed.)
            r = committed.changed(), if !acked.is_empty() || end.is_some() => if r.is_err() { return; },
            // Acknowledgements first: they free memory and let commits move (finished records
            // are always ready and would starve them under biased polling).
            Some(d) = deliveries.next(), if !deliveries.is_empty() => {
                match d.result {
                    Ok(_) => {
                        // Records from before an offset reset are never committed: they do not
                        // count against --max-uncommitted.
                        if last_epoch == Some(d.token.epoch) {
                            acked.push_back(d.token.offset);
                        }
                        unfinished.remove(d.token.offset);
                        ctx.acker.complete(&d.token);
                    }
                    // The broker refused the answer for good: an error record takes its place.
                    // Exactly-once: the transaction failed; the window is aborted and the
                    // record redone by its next owner.
                    Err(ProduceError::Transaction(_)) => ctx.acker.abandon(&d.token),
                    Err(e) if d.answer && !matches!(e, ProduceError::Closed) => {
                        let f = Failure::answer_unwritable(&e);
                        match write_error(&ctx, input_partition, &d.rec, &d.token, &f, Some(&d.topic), d.meta.as_ref()).await {
                            Some(w) => {
                                let mut rec = d.rec;
                                rec.charge.add(w.cost);
                                deliveries.push(delivered(w, rec, d.token))
                            }
                            None => {
                                unfinished.remove(d.token.offset);
                                ctx.acker.abandon(&d.token)
                            }
                        }
                    }
                    Err(ProduceError::Closed) => {
                        unfinished.remove(d.token.offset);
                        ctx.acker.abandon(&d.token)
                    }
                    Err(e) => {
                        fatal(&ctx, format!("input partition {input_partition} offset {}: its error record cannot be written: {e}", d.rec.offset));
                        unfinished.remove(d.token.offset);
                        ctx.acker.abandon(&d.token);
                    }
                }
            }
            Some((mut rec, token, outcome)) = running.next(), if !running.is_empty() => {
                ctx.metrics.in_flight.dec();
                match write_result(&ctx, input_partition, &rec, &token, outcome).await {
                    Some(w) => {
                        rec.charge.add(w.cost);
                        deliveries.push(delivered(w, rec, token))
                    }
                    // Interrupted by shutdown, or unwritable (fatal): left uncommitted.
                    None => {
                        unfinished.remove(token.offset);
                        ctx.acker.abandon(&token)
                    }
                }
            }
            next = stream.recv(), if open && queue.len() < ctx.max_in_flight => {
                match next {
                    Some(b) => {
                        let (topic, partition, epoch) = (b.topic.clone(), b.partition, b.epoch);
                        let arrived = tokio::time::Instant::now();
                        if last_epoch.is_some_and(|e| e != epoch) {
                            // An offset reset: what was acknowledged before it is not committed.
                            acked.clear();
                        }
                        last_epoch = Some(epoch);
                        for r in &b.records {
                            unfinished.add(r.offset, r.timestamp_ms);
                        }
                        queue.extend(b.records.into_iter().map(|r| {
                            let token = Token { topic: topic.clone(), partition, offset: r.offset, epoch };
                            Queued { rec: r, token, arrived, part: None }
                        }));
                    }
                    None => open = false,
                }
            }
            _ = ctx.stop_changed(), if open => {}
            else => break,
        }
    }
}

/// How old the record is now, by its Kafka timestamp (None: it has none).
fn record_age(rec: &InRecord) -> Option<Duration> {
    if rec.timestamp_ms < 0 {
        return None;
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .ok()?
        .as_millis() as i64;
    Some(Duration::from_millis((now - rec.timestamp_ms).max(0) as u64))
}

/// A partition worker's records received and not finished, by offset, with their Kafka
/// timestamps; the oldest one's is published for kafka_infer_consumer_lag_seconds (and
/// withdrawn when the worker ends).
struct Unfinished {
    topic: Arc<str>,
    partition: i32,
    metrics: Arc<Metrics>,
    records: std::collections::BTreeMap<i64, i64>,
    published: Option<i64>,
}

impl Unfinished {
    fn add(&mut self, offset: i64, timestamp_ms: i64) {
        if timestamp_ms >= 0 {
            self.records.insert(offset, timestamp_ms);
        }
    }

    fn remove(&mut self, offset: i64) {
        self.records.remove(&offset);
    }

    fn publish(&mut self) {
        let oldest = self.records.first_key_value().map(|(_, t)| *t);
        if oldest != self.published {
            self.metrics.set_oldest(&self.topic, self.partition, oldest);
            self.published = oldest;
        }
    }
}

impl Drop for Unfinished {
    fn drop(&mut self) {
        self.metrics.set_oldest(&self.topic, self.partition, None);
    }
}

/// A worker's entry in [`Until`], removed when the worker ends (the partition left).
struct UntilEntry(Option<Arc<Until>>, Arc<str>, i32);

impl Drop for UntilEntry {
    fn drop(&mut self) {
        if let Some(u) = &self.0 {
            u.set(&self.1, self.2, None);
        }
    }
}

/// A partition's share of [`Ctx::pressure`], taken back when its worker ends.
struct Pressure {
    count: Arc<AtomicUsize>,
    on: bool,
}

impl Pressure {
    fn set(&mut self, on: bool) {
        if on != self.on {
            if on {
                self.count.fetch_add(1, Ordering::Relaxed);
            } else {
                self.count.fetch_sub(1, Ordering::Relaxed);
            }
            self.on = on;
        }
    }
}

impl Drop for Pressure {
    fn drop(&mut self) {
        self.set(false);
    }
}

/// A record received and not started.
struct Queued {
    rec: InRecord,
    token: Token,
    arrived: tokio::time::Instant,
    /// Its request as a batch part (batching on, a JSON request that can merge).
    part: Option<codec::batch::Part>,
}

/// A record whose processing ended.
type Done = (InRecord, Token, Outcome);

/// The record's request as a batch part: JSON (no proto-name) that merges.
fn batch_part(ctx: &Ctx, rec: &InRecord) -> Option<codec::batch::Part> {
    if rec
        .headers
        .iter()
        .any(|(k, _)| k.eq_ignore_ascii_case("proto-name"))
    {
        return None;
    }
    codec::batch::part(ctx.protocol, rec.value.as_deref()?)
}

/// Runs one record: alone, or through the batcher (which may send it back to run alone).
async fn run_record(ctx: Arc<Ctx>, partition: i32, q: Queued) -> Done {
    let outcome = match (q.part, &ctx.batcher) {
        (Some(part), Some(batcher)) => {
            let (reply, answer) = tokio::sync::oneshot::channel();
            let pending = batcher::Pending {
                partition,
                offset: q.rec.offset,
                headers: q.rec.headers.clone(),
                part,
                arrived: q.arrived,
                reply,
            };
            match batcher.send(pending).map(|()| answer) {
                Ok(answer) => match answer.await {
                    Ok(batcher::Reply::Done(o)) => *o,
                    Ok(batcher::Reply::Alone(running)) => {
                        let o = process(ctx.clone(), partition, &q.rec).await;
                        drop(running);
                        o
                    }
                    // The batcher task ended without answering: left uncommitted, redone later.
                    Err(_) => Outcome::Abandoned,
                },
                // The batcher is closed (shutdown): left uncommitted, redone later.
                Err(_) => Outcome::Abandoned,
            }
        }
        _ => process(ctx.clone(), partition, &q.rec).await,
    };
    (q.rec, q.token, outcome)
}

/// What a batch needs of each of its records.
struct Item<'a> {
    partition: i32,
    offset: i64,
    headers: &'a [(String, Bytes)],
}

/// One model request for several records, the answer split back; None when the batch failed
/// for good (the records are then run alone).
async fn process_batch(
    ctx: &Ctx,
    recs: &[Item<'_>],
    parts: &[codec::batch::Part],
) -> Option<Vec<Outcome>> {
    let merged = codec::batch::merge(ctx.protocol, parts).ok()?;
    let metas: Vec<RecordMeta> = recs
        .iter()
        .map(|r| ctx.record_meta(r.headers, r.partition, r.offset, true))
        .collect();
    // The batch's call carries the headers all its records share, and an id of its own.
    let first = recs[0].headers;
    let common: Vec<(String, Bytes)> = first
        .iter()
        .filter(|h| recs[1..].iter().all(|r| r.headers.contains(h)))
        .cloned()
        .collect();
    let batch_meta = ctx.record_meta(&common, recs[0].partition, recs[0].offset, false);
    let answer = ctx.graph.infer_batch(Msg::Json(merged), &batch_meta).await;
    match answer {
        Ok(Msg::Json(b)) => match codec::batch::split(ctx.protocol, &b, parts) {
            Ok(answers) => Some(
                answers
                    .into_iter()
                    .zip(metas)
                    .map(|(a, m)| {
                        m.absorb(&batch_meta);
                        Outcome::Answer(Msg::Json(a), m)
                    })
                    .collect(),
            ),
            Err(e) => {
                tracing::warn!(records = recs.len(), error = %printable(&e), "batch answer does not split: running its records alone");
                None
            }
        },
        Ok(Msg::Proto { .. }) => None,
        Err(CallError::Stopped(_)) => Some(recs.iter().map(|_| Outcome::Abandoned).collect()),
        Err(e) => {
            tracing::info!(records = recs.len(), error = %printable(&e), "batch failed: running its records alone");
            None
        }
    }
}

/// A written record's fate, with what is needed to write an error record in its place.
struct Delivered {
    token: Token,
    rec: InRecord,
    answer: bool,
    meta: Option<RecordMeta>,
    topic: String,
    result: Result<i64, ProduceError>,
}

fn delivered(
    w: Written,
    rec: InRecord,
    token: Token,
) -> futures::future::BoxFuture<'static, Delivered> {
    Box::pin(async move {
        let result = w.delivery.wait().await;
        Delivered {
            token,
            rec,
            answer: w.answer,
            meta: w.meta,
            topic: w.topic,
            result,
        }
    })
}

/// The input's headers for its output or error record. Others of ours stay, such as `redrive`'s
/// `kafka-infer-redriven` mark: a redriven record that fails again keeps its count.
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

/// Why a record gets an error record instead of an answer.
pub(crate) struct Failure {
    kind: &'static str,
    message: String,
    /// An HTTP-like status for protocol-shaped error bodies.
    status: u16,
}

/// How many characters of an error's text go into a log line or an error record (the
/// record- or model-supplied parts in it are cut shorter where they are read).
pub(crate) const MAX_MESSAGE: usize = 2048;

/// Error text fit for a log line or an error record: control characters escaped, length
/// bounded (it may carry what a record or a model sent).
pub(crate) fn printable(e: &impl std::fmt::Display) -> String {
    codec::text::printable(&e.to_string(), MAX_MESSAGE)
}

impl From<&CallError> for Failure {
    fn from(e: &CallError) -> Self {
        Self {
            kind: e.kind(),
            message: printable(e),
            status: match e {
                CallError::Model(m) => m.status(),
                _ => 400,
            },
        }
    }
}

impl Failure {
    fn answer_unwritable(e: &ProduceError) -> Self {
        match e {
            ProduceError::TooLarge { .. } => Self {
                kind: "answer-too-large",
                message: printable(&format!("the answer cannot be written: {e}")),
                status: 413,
            },
            _ => Self {
                kind: "answer-rejected",
                message: printable(&format!("the answer cannot be written: {e}")),
                status: 500,
            },
        }
    }
}

/// A record written (or being written) for an input, and what it was.
struct Written {
    delivery: Delivery,
    /// What the written record costs until it is acknowledged (charged to the input record's
    /// share of the fetch buffer).
    cost: usize,
    /// The output topic got the model's answer (not an error record).
    answer: bool,
    /// The record's request id and trace, for an error record in the answer's place.
    meta: Option<RecordMeta>,
    topic: String,
}

/// Queues the record's result (in order); None when abandoned (shutdown) or when the result
/// cannot be written at all (then `ctx.fatal` has been told).
async fn write_result(
    ctx: &Ctx,
    input_partition: i32,
    rec: &InRecord,
    token: &Token,
    outcome: Outcome,
) -> Option<Written> {
    let failure = match outcome {
        Outcome::Abandoned => return None,
        Outcome::Answer(m, rm) => {
            let mut headers = copy_headers(rec);
            set_headers(&mut headers, rm.record_headers(true));
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
            let out = OutRecord {
                key: rec.key.clone(),
                value: Some(value),
                headers,
            };
            let cost = kafka_io::fetch::budget::answer_cost(out.value.as_ref(), &out.headers);
            let topic = ctx.output_topic.as_str();
            // `send` refuses an answer too large for the topic before queueing it, so its
            // error record takes its place in the partition's order.
            match queue(ctx, topic, input_partition, token, out).await {
                Ok(delivery) => {
                    ctx.metrics.record("ok");
                    return Some(Written {
                        delivery,
                        cost,
                        answer: true,
                        meta: Some(rm),
                        topic: topic.to_owned(),
                    });
                }
                // Exactly-once: the window was aborted; the record is redone by its next owner.
                Err(ProduceError::Transaction(_)) => return None,
                Err(e) => (Failure::answer_unwritable(&e), Some(rm)),
            }
        }
        Outcome::Failed(e, rm) => (Failure::from(&e), rm),
        Outcome::Expired(why, rm) => (
            Failure {
                kind: "expired",
                message: why,
                status: 408,
            },
            Some(rm),
        ),
    };
    let (failure, rm) = failure;
    write_error(
        ctx,
        input_partition,
        rec,
        token,
        &failure,
        None,
        rm.as_ref(),
    )
    .await
}

/// Sets each of `extra` on `headers`, replacing a header of the same name (case-insensitive).
fn set_headers(headers: &mut Vec<(String, Bytes)>, extra: Vec<(String, Bytes)>) {
    for (k, v) in extra {
        headers.retain(|(n, _)| !n.eq_ignore_ascii_case(&k));
        headers.push((k, v));
    }
}

/// Writes an error record for `rec`: to the error topic (input kept as it was, if it fits), or
/// to the output topic as a protocol-shaped error answer. `not_to` is a topic that already
/// refused this input's record. None (and `ctx.fatal` told) when no error record can be queued.
async fn write_error(
    ctx: &Ctx,
    input_partition: i32,
    rec: &InRecord,
    token: &Token,
    f: &Failure,
    not_to: Option<&str>,
    rm: Option<&RecordMeta>,
) -> Option<Written> {
    ctx.metrics.record(if f.kind == "expired" {
        "expired"
    } else {
        "error"
    });
    // A burst of bad records writes a few lines and a summary, not a line each.
    if crate::ratelog::RECORD_FAILED.admit(f.kind, Some((input_partition, rec.offset))) {
        tracing::warn!(partition = input_partition, offset = rec.offset, kind = f.kind, error = %f.message, "record failed");
    }
    let error_headers = [
        (ERROR_HEADER.to_owned(), Bytes::from(f.message.clone())),
        (
            ERROR_KIND_HEADER.to_owned(),
            Bytes::from_static(f.kind.as_bytes()),
        ),
    ];
    let topic = match (&ctx.error_topic, not_to) {
        (Some(t), Some(n)) if t == n => None,
        (Some(t), _) => Some(t.as_str()),
        (None, Some(n)) if n == ctx.output_topic && f.kind != "answer-too-large" => None,
        (None, _) => Some(ctx.output_topic.as_str()),
    };
    let Some(topic) = topic else {
        fatal(
            ctx,
            format!(
                "input partition {input_partition} offset {}: {}; no other topic can take its error record (set KAFKA_ERROR_TOPIC)",
                rec.offset, f.message
            ),
        );
        return None;
    };
    let mut headers = copy_headers(rec);
    if let Some(rm) = rm {
        set_headers(&mut headers, rm.record_headers(false));
    }
    headers.extend(error_headers.iter().cloned());
    let out = if ctx.error_topic.as_deref() == Some(topic) {
        // The error topic keeps the input as it was, for replay.
        for (k, v) in &rec.headers {
            if k.eq_ignore_ascii_case("proto-name") || k.eq_ignore_ascii_case("content-type") {
                headers.push((k.clone(), v.clone()));
            }
        }
        OutRecord {
            key: rec.key.clone(),
            value: Some(rec.value.clone().unwrap_or_default()),
            headers,
        }
    } else {
        let (value, proto) = error_body(ctx, rec, f);
        match proto {
            Some(name) => headers.push(("proto-name".into(), Bytes::from_static(name.as_bytes()))),
            None => headers.push((
                "content-type".into(),
                Bytes::from_static(b"application/json"),
            )),
        }
        OutRecord {
            key: rec.key.clone(),
            value: Some(value),
            headers,
        }
    };
    let cost = kafka_io::fetch::budget::answer_cost(out.value.as_ref(), &out.headers);
    let mut queued = queue(ctx, topic, input_partition, token, out).await;
    if let Err(ProduceError::TooLarge { .. }) = queued {
        // Too large with the input (or its headers): keep only what says what happened.
        let mut slim = error_headers.to_vec();
        slim.push((
            "kafka-infer-input-dropped".into(),
            Bytes::from_static(b"too-large"),
        ));
        let slim = OutRecord {
            key: rec.key.clone(),
            value: None,
            headers: slim,
        };
        queued = queue(ctx, topic, input_partition, token, slim).await;
    }
    match queued {
        Ok(delivery) => Some(Written {
            delivery,
            cost,
            answer: false,
            meta: None,
            topic: topic.to_owned(),
        }),
        // Exactly-once: the window was aborted; the record is redone by its next owner.
        Err(ProduceError::Transaction(_)) => None,
        Err(e) => {
            fatal(
                ctx,
                format!(
                    "input partition {input_partition} offset {}: {}; its error record cannot be written either: {e}",
                    rec.offset, f.message
                ),
            );
            None
        }
    }
}

/// Queues `out` on `topic`: by key, else on the input's partition number (modulo the topic's).
async fn queue(
    ctx: &Ctx,
    topic: &str,
    input_partition: i32,
    token: &Token,
    out: OutRecord,
) -> Result<Delivery, ProduceError> {
    // Exactly-once: queued under the window's gate (never while a transaction ends), only for
    // a stream from after the last abort, and the record completes when its answer is
    // acknowledged (in the writer, so the commit that follows the flush sees it).
    let window = ctx.window.as_deref();
    let _gate = match window {
        Some(w) => {
            let g = w.gate.read().await;
            if token.epoch < w.min_epoch.load(Ordering::SeqCst) {
                return Err(ProduceError::Transaction(
                    "the transaction window was aborted".into(),
                ));
            }
            Some(g)
        }
        None => None,
    };
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    // Bounded: metadata that stays unreadable this long is an outage worth stopping for.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let partition = match &out.key {
            Some(_) => Ok(None),
            None => ctx
                .producer
                .partition_count(topic)
                .await
                .map(|n| Some(input_partition % n.max(1))),
        };
        let r = match partition {
            Ok(p) => {
                let on_written: Option<kafka_io::OnWritten> = window.map(|_| {
                    let (acker, token) = (ctx.acker.clone(), token.clone());
                    Box::new(move || acker.complete(&token)) as kafka_io::OnWritten
                });
                ctx.producer
                    .send_with(topic, p, out.clone(), on_written)
                    .await
            }
            Err(e) => Err(e),
        };
        match r {
            Ok(d) => return Ok(d),
            Err(kafka_io::Error::UnknownTopic(t)) => return Err(ProduceError::UnknownTopic(t)),
            Err(kafka_io::Error::Produce(e)) => return Err(e),
            Err(kafka_io::Error::Closed) => return Err(ProduceError::Closed),
            Err(e) if tokio::time::Instant::now() < deadline => {
                tracing::warn!(%topic, error = %e, "cannot queue result, retrying");
                tokio::time::sleep(backoff.next_wait()).await;
            }
            Err(e) => {
                return Err(ProduceError::Rejected {
                    topic: topic.to_owned(),
                    why: e.to_string(),
                });
            }
        }
    }
}

impl Ctx {
    /// Resolves when the workers' stop is set (it may be set already).
    async fn stop_changed(&self) {
        let mut s = self.stop.clone();
        let _ = s.wait_for(|v| *v).await;
    }
}

/// Stops the process with `why` (exit non-zero); nothing is committed past the record.
fn fatal(ctx: &Ctx, why: String) {
    tracing::error!("{why}");
    let _ = ctx.fatal.send(Some(why));
}

/// A protocol-shaped error answer (for the output topic when there is no error topic).
fn error_body(ctx: &Ctx, rec: &InRecord, e: &Failure) -> (Bytes, Option<&'static str>) {
    let status = e.status;
    let was_proto = rec
        .headers
        .iter()
        .any(|(k, _)| k.eq_ignore_ascii_case("proto-name"));
    match ctx.protocol {
        Protocol::Seldon => {
            let v = serde_json::json!({"status": {"code": status, "info": e.message, "reason": e.kind, "status": "FAILURE"}});
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
            let v = serde_json::json!({"error": e.message});
            (Bytes::from(serde_json::to_vec(&v).expect("json")), None)
        }
    }
}
