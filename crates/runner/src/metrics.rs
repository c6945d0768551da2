//! Metrics (Prometheus text on /metrics) and health (/live, /ready), served by a small hyper
//! server on --metrics-addr.

use std::{
    net::SocketAddr,
    sync::{
        Arc, PoisonError, RwLock,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::Full;
use hyper::{server::conn::http1, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric, text::encode},
    metrics::{
        MetricType, counter::Counter, family::Family, gauge::ConstGauge, gauge::Gauge,
        histogram::Histogram,
    },
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LagLabels {
    pub topic: String,
    pub partition: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: String,
}

/// The lag series: one snapshot, replaced whole by [`Metrics::set_lag`] and read whole by a
/// scrape, so a scrape sees one complete set, never a half-filled one.
#[derive(Debug, Default)]
struct LagSet(RwLock<Arc<Vec<(LagLabels, i64, f64)>>>);

const LAG_NAME: &str = "kafka_infer_consumer_lag";
const LAG_HELP: &str =
    "Records not yet committed per partition (high watermark - committed offset)";
const LAG_SECONDS_NAME: &str = "kafka_infer_consumer_lag_seconds";
const LAG_SECONDS_HELP: &str = "Age of the oldest unprocessed record per partition (now - its \
     Kafka timestamp), of the records this member holds; 0 when it holds none";

impl LagSet {
    fn replace(&self, lags: Vec<(LagLabels, i64, f64)>) {
        *self.0.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(lags);
    }

    fn snapshot(&self) -> Arc<Vec<(LagLabels, i64, f64)>> {
        self.0
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl Collector for LagSet {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let lags = self.snapshot();
        {
            let mut series =
                encoder.encode_descriptor(LAG_NAME, LAG_HELP, None, MetricType::Gauge)?;
            for (labels, lag, _) in lags.iter() {
                ConstGauge::new(*lag).encode(series.encode_family(labels)?)?;
            }
        }
        let mut series = encoder.encode_descriptor(
            LAG_SECONDS_NAME,
            LAG_SECONDS_HELP,
            None,
            MetricType::Gauge,
        )?;
        for (labels, _, age) in lags.iter() {
            ConstGauge::new(*age).encode(series.encode_family(labels)?)?;
        }
        Ok(())
    }
}

pub struct Metrics {
    registry: Registry,
    lag: Arc<LagSet>,
    pub model_duration: Histogram,
    /// Records per model request (batching on).
    pub batch_size: Histogram,
    pub in_flight: Gauge,
    /// Partitions whose records wait for a model slot (the producer lingers longer meanwhile).
    pub model_bound: Gauge,
    /// Partitions that cannot go on (a record larger than the whole fetch buffer).
    pub stalled: Gauge,
    /// Bytes of the fetch buffer held by fetched, unfinished records.
    pub fetch_buffer: Gauge,
    pub ready: AtomicBool,
    /// 1 when SASL PLAIN runs without TLS (the password crosses the network as it is).
    pub sasl_plaintext_credentials: Gauge,
    /// Seconds the brokers' quotas throttled the producer (throttle_time_ms of Produce).
    produce_throttled: Counter<f64, AtomicU64>,
    /// The producer's throttled milliseconds already counted.
    produce_throttled_ms: AtomicU64,
    /// The result series, made once (no allocation per record).
    by_result: [(&'static str, Counter); 4],
    /// Per partition, the timestamp (ms) of the oldest record the member holds unfinished.
    oldest: std::sync::Mutex<std::collections::HashMap<(String, i32), i64>>,
    /// Payload-logger events by result: sent, failed, dropped.
    pub logger_events: [(&'static str, Counter); 3],
    /// Transactions (--exactly-once) by result: committed, aborted.
    transactions: [(&'static str, Counter); 2],
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let lag = Arc::new(LagSet::default());
        let records = Family::<ResultLabels, Counter>::default();
        let model_duration = Histogram::new([
            0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
        ]);
        let in_flight = Gauge::default();
        let batch_size = Histogram::new([1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0]);
        registry.register(
            "kafka_infer_batch_size",
            "Records per model request (with --batch-size above 1)",
            batch_size.clone(),
        );
        registry.register_collector(Box::new(lag.clone()));
        registry.register(
            "kafka_infer_records",
            "Input records by result: ok, error (answered with an error record), expired (an \
             error record: older than --max-record-age when its turn came), retry (model call \
             retries)",
            records.clone(),
        );
        registry.register(
            "kafka_infer_model_request_duration_seconds",
            "Duration of model calls",
            model_duration.clone(),
        );
        registry.register(
            "kafka_infer_in_flight",
            "Records being processed",
            in_flight.clone(),
        );
        let model_bound = Gauge::default();
        registry.register(
            "kafka_infer_model_bound_partitions",
            "Partitions whose records wait for a model slot (all --max-in-flight calls running); \
             meanwhile answers linger up to --linger-max before they are produced",
            model_bound.clone(),
        );
        let stalled = Gauge::default();
        registry.register(
            "kafka_infer_stalled_partitions",
            "Partitions that cannot go on: their next record is larger than the whole fetch \
             buffer (raise --fetch-buffer-bytes); /ready answers 503 meanwhile",
            stalled.clone(),
        );
        let fetch_buffer = Gauge::default();
        registry.register(
            "kafka_infer_fetch_buffer_bytes",
            "Bytes of the fetch buffer (--fetch-buffer-bytes) held by fetched records not yet \
             finished, counted per decoded record",
            fetch_buffer.clone(),
        );
        let sasl_plaintext_credentials = Gauge::default();
        registry.register(
            "kafka_infer_sasl_plaintext_credentials",
            "1 when the Kafka password is sent in clear text: SASL PLAIN (the default \
             KAFKA_SASL_MECHANISM) with KAFKA_SECURITY_PROTOCOL=SASL_PLAINTEXT; use SASL_SSL or \
             SCRAM",
            sasl_plaintext_credentials.clone(),
        );
        let produce_throttled = Counter::<f64, AtomicU64>::default();
        registry.register(
            "kafka_infer_produce_throttled_seconds",
            "Time the brokers' quotas throttled the output producer (throttle_time_ms in Produce \
             responses; the next request to that broker waits, nothing is resent)",
            produce_throttled.clone(),
        );
        let by_result = ["ok", "error", "retry", "expired"].map(|r| {
            let c = records
                .get_or_create(&ResultLabels {
                    result: r.to_owned(),
                })
                .clone();
            (r, c)
        });
        let txns = Family::<ResultLabels, Counter>::default();
        registry.register(
            "kafka_infer_transactions",
            "Transactions with --exactly-once by result: committed (answers and offsets), \
             aborted (revoke, shutdown, fenced or failed: the input is redone)",
            txns.clone(),
        );
        let transactions = ["committed", "aborted"].map(|r| {
            let c = txns
                .get_or_create(&ResultLabels {
                    result: r.to_owned(),
                })
                .clone();
            (r, c)
        });
        let logger = Family::<ResultLabels, Counter>::default();
        registry.register(
            "kafka_infer_logger_events",
            "Payload-logger (graph node `logger`) CloudEvents by result: sent, failed (the \
             endpoint refused or was unreachable), dropped (queue full)",
            logger.clone(),
        );
        let logger_events = ["sent", "failed", "dropped"].map(|r| {
            let c = logger
                .get_or_create(&ResultLabels {
                    result: r.to_owned(),
                })
                .clone();
            (r, c)
        });
        Self {
            batch_size,
            by_result,
            oldest: Default::default(),
            logger_events,
            transactions,
            registry,
            lag,
            model_duration,
            in_flight,
            model_bound,
            stalled,
            fetch_buffer,
            ready: AtomicBool::new(false),
            sasl_plaintext_credentials,
            produce_throttled,
            produce_throttled_ms: AtomicU64::new(0),
        }
    }

    /// Counts one record (or retry) under `result`: ok, error or retry.
    pub fn record(&self, result: &str) {
        if let Some((_, c)) = self.by_result.iter().find(|(r, _)| *r == result) {
            c.inc();
        }
    }

    /// Counts one transaction under `result`: committed or aborted.
    pub fn transaction(&self, result: &str) {
        if let Some((_, c)) = self.transactions.iter().find(|(r, _)| *r == result) {
            c.inc();
        }
    }

    /// Counts one payload-logger event under `result`: sent, failed or dropped.
    pub fn logger_event(&self, result: &str) {
        if let Some((_, c)) = self.logger_events.iter().find(|(r, _)| *r == result) {
            c.inc();
        }
    }

    /// Brings the throttled-time counter up to the producer's total (`Producer::throttled_ms`).
    pub fn set_produce_throttled_ms(&self, total_ms: u64) {
        let before = self.produce_throttled_ms.swap(total_ms, Ordering::Relaxed);
        if total_ms > before {
            self.produce_throttled
                .inc_by((total_ms - before) as f64 / 1000.0);
        }
    }

    /// Records answered so far (the `ok` series).
    pub fn ok_total(&self) -> u64 {
        self.by_result[0].1.get()
    }

    /// Records counted under `result` so far.
    pub fn total(&self, result: &str) -> u64 {
        self.by_result
            .iter()
            .find(|(r, _)| *r == result)
            .map_or(0, |(_, c)| c.get())
    }

    /// Says which record of the partition is the oldest the member holds unfinished (its
    /// Kafka timestamp in ms; None: it holds none), for kafka_infer_consumer_lag_seconds.
    pub fn set_oldest(&self, topic: &str, partition: i32, timestamp_ms: Option<i64>) {
        let mut o = self.oldest.lock().unwrap_or_else(PoisonError::into_inner);
        match timestamp_ms {
            Some(t) => {
                o.insert((topic.to_owned(), partition), t);
            }
            None => {
                o.remove(&(topic.to_owned(), partition));
            }
        }
    }

    /// Replaces the lag series with the current assignment's partitions, in one step: a scrape
    /// sees either the previous set or this one. The age of a partition's oldest unprocessed
    /// record is now minus the timestamp [`Metrics::set_oldest`] was given, 0 without lag.
    pub fn set_lag(&self, lags: &[kafka_io::PartitionLag]) {
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        let oldest = self.oldest.lock().unwrap_or_else(PoisonError::into_inner);
        self.lag.replace(
            lags.iter()
                .map(|l| {
                    let age = match oldest.get(&(l.topic.clone(), l.partition)) {
                        Some(ts) if l.lag > 0 => (now_ms - ts).max(0) as f64 / 1000.0,
                        _ => 0.0,
                    };
                    let labels = LagLabels {
                        topic: l.topic.clone(),
                        partition: l.partition.to_string(),
                    };
                    (labels, l.lag, age)
                })
                .collect(),
        );
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String");
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Bounds on the metrics server's clients.
#[derive(Clone, Copy, Debug)]
struct Limits {
    /// A request's header must arrive whole within this time, or the connection is closed.
    header_read: Duration,
    /// A connection is closed after this long (gracefully: a request in progress may finish
    /// within `grace`), idle keep-alive connections included.
    life: Duration,
    grace: Duration,
    /// Connections served at once. A new one past this closes the oldest connection not in
    /// the middle of a request, so idle connections held open cannot lock out the kubelet's
    /// probes; the new one is closed only when every connection is mid-request.
    connections: usize,
}

const LIMITS: Limits = Limits {
    header_read: Duration::from_secs(5),
    life: Duration::from_secs(60),
    grace: Duration::from_secs(5),
    connections: 64,
};

/// Waits after a failed accept (e.g. out of file descriptors), doubling up to the cap.
const ACCEPT_BACKOFF: (Duration, Duration) = (Duration::from_millis(10), Duration::from_secs(1));

/// Serves /metrics, /live and /ready until the task is dropped.
pub async fn serve(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("--metrics-addr {addr}: {e}"))?;
    tracing::info!(%addr, "metrics and health listening");
    Ok(tokio::spawn(accept_loop(listener, metrics, LIMITS)))
}

/// One open connection, as the accept loop sees it.
struct Open {
    id: u64,
    /// A request is being answered on it.
    busy: Arc<AtomicBool>,
    /// Dropped to close the connection at once.
    _close: tokio::sync::oneshot::Sender<()>,
}

/// The open connections, oldest first.
#[derive(Default)]
struct Slots(std::sync::Mutex<std::collections::VecDeque<Open>>);

impl Slots {
    /// Makes room for a new connection: below the limit there is room; at it, the oldest
    /// connection not mid-request is closed. None: every connection is mid-request.
    fn admit(
        &self,
        id: u64,
        limit: usize,
    ) -> Option<(Arc<AtomicBool>, tokio::sync::oneshot::Receiver<()>)> {
        let mut open = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if open.len() >= limit {
            let idle = open.iter().position(|c| !c.busy.load(Ordering::Acquire))?;
            // Dropping its sender closes it.
            open.remove(idle);
        }
        let busy = Arc::new(AtomicBool::new(false));
        let (close, closed) = tokio::sync::oneshot::channel();
        open.push_back(Open {
            id,
            busy: busy.clone(),
            _close: close,
        });
        Some((busy, closed))
    }

    fn release(&self, id: u64) {
        let mut open = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(i) = open.iter().position(|c| c.id == id) {
            open.remove(i);
        }
    }
}

async fn accept_loop(listener: tokio::net::TcpListener, metrics: Arc<Metrics>, limits: Limits) {
    let slots = Arc::new(Slots::default());
    let mut backoff = ACCEPT_BACKOFF.0;
    let mut next_id = 0u64;
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => {
                backoff = ACCEPT_BACKOFF.0;
                stream
            }
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?backoff, "metrics server: accept failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(ACCEPT_BACKOFF.1);
                continue;
            }
        };
        next_id += 1;
        let id = next_id;
        let Some((busy, closed)) = slots.admit(id, limits.connections) else {
            tracing::debug!("metrics server: every connection is mid-request; closing a new one");
            continue;
        };
        let (m, slots) = (metrics.clone(), slots.clone());
        tokio::spawn(async move {
            tokio::select! {
                _ = serve_connection(stream, m, limits, busy) => {}
                // Closed to make room for a newer connection.
                _ = closed => {}
            }
            slots.release(id);
        });
    }
}

/// Marks a connection busy while a request is answered (cleared however the answer ends).
struct Busy(Arc<AtomicBool>);

impl Busy {
    fn start(flag: &Arc<AtomicBool>) -> Self {
        flag.store(true, Ordering::Release);
        Self(flag.clone())
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

async fn serve_connection(
    stream: tokio::net::TcpStream,
    m: Arc<Metrics>,
    limits: Limits,
    busy: Arc<AtomicBool>,
) {
    let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
        let m = m.clone();
        let busy = Busy::start(&busy);
        async move {
            let _busy = busy;
            let (status, ctype, body) = match req.uri().path() {
                "/metrics" => (
                    StatusCode::OK,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    m.render(),
                ),
                "/live" => (StatusCode::OK, "text/plain", "live\n".into()),
                "/ready" if m.ready.load(Ordering::Relaxed) => {
                    (StatusCode::OK, "text/plain", "ready\n".into())
                }
                "/ready" => (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    "not ready\n".into(),
                ),
                _ => (StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
            };
            Response::builder()
                .status(status)
                .header("content-type", ctype)
                .body(Full::new(Bytes::from(body)))
        }
    });
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read)
        .serve_connection(TokioIo::new(stream), svc);
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => return,
        _ = tokio::time::sleep(limits.life) => {}
    }
    conn.as_mut().graceful_shutdown();
    let _ = tokio::time::timeout(limits.grace, conn).await;
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    fn lags(lag: i64, partitions: i32) -> Vec<kafka_io::PartitionLag> {
        (0..partitions)
            .map(|partition| kafka_io::PartitionLag {
                topic: "in".into(),
                partition,
                high_watermark: lag,
                committed: Some(0),
                lag,
            })
            .collect()
    }

    /// The values of the lag series in a scrape.
    fn lag_values(text: &str) -> Vec<i64> {
        text.lines()
            .filter(|l| l.starts_with("kafka_infer_consumer_lag{"))
            .map(|l| {
                l.rsplit(' ')
                    .next()
                    .and_then(|v| v.parse().ok())
                    .expect("a value")
            })
            .collect()
    }

    #[test]
    fn produce_throttled_seconds_follow_the_producer_total() {
        let m = Metrics::new();
        m.set_produce_throttled_ms(1500);
        m.set_produce_throttled_ms(1500);
        m.set_produce_throttled_ms(2000);
        let text = m.render();
        assert!(
            text.contains("# TYPE kafka_infer_produce_throttled_seconds counter"),
            "{text}"
        );
        assert!(
            text.contains("kafka_infer_produce_throttled_seconds_total 2.0"),
            "{text}"
        );
    }

    /// The value of `series` (a full series name with labels) in a scrape.
    fn value_of(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find(|l| l.starts_with(series))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
    }

    #[test]
    fn lag_seconds_is_the_age_of_the_oldest_unfinished_record_while_there_is_lag() {
        let m = Metrics::new();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64;
        m.set_oldest("in", 0, Some(now - 5_000));
        m.set_lag(&lags(3, 2));
        let text = m.render();
        assert!(
            text.contains("# TYPE kafka_infer_consumer_lag_seconds gauge"),
            "{text}"
        );
        let age = value_of(
            &text,
            r#"kafka_infer_consumer_lag_seconds{topic="in",partition="0"}"#,
        )
        .expect("partition 0");
        assert!((5.0..60.0).contains(&age), "{text}");
        // Nothing held of partition 1: no age known, 0.
        assert_eq!(
            value_of(
                &text,
                r#"kafka_infer_consumer_lag_seconds{topic="in",partition="1"}"#
            ),
            Some(0.0)
        );
        // No lag: 0, whatever is held.
        m.set_lag(&lags(0, 1));
        assert_eq!(
            value_of(
                &m.render(),
                r#"kafka_infer_consumer_lag_seconds{topic="in",partition="0"}"#
            ),
            Some(0.0)
        );
        // Withdrawn (the worker ended).
        m.set_oldest("in", 0, None);
        m.set_lag(&lags(3, 1));
        assert_eq!(
            value_of(
                &m.render(),
                r#"kafka_infer_consumer_lag_seconds{topic="in",partition="0"}"#
            ),
            Some(0.0)
        );
    }

    #[test]
    fn lag_series_are_the_last_set_given() {
        let m = Metrics::new();
        m.set_lag(&lags(5, 2));
        let text = m.render();
        assert!(
            text.contains("# TYPE kafka_infer_consumer_lag gauge"),
            "{text}"
        );
        assert!(
            text.contains(r#"kafka_infer_consumer_lag{topic="in",partition="1"} 5"#),
            "{text}"
        );
        // A revoked partition's series goes.
        m.set_lag(&lags(7, 1));
        let text = m.render();
        assert_eq!(lag_values(&text), [7], "{text}");
        assert!(!text.contains(r#"partition="1""#), "{text}");
    }

    #[test]
    fn a_scrape_sees_a_whole_lag_set_never_a_partial_one() {
        const PARTITIONS: i32 = 16;
        let m = Arc::new(Metrics::new());
        m.set_lag(&lags(0, PARTITIONS));
        let writer = {
            let m = m.clone();
            std::thread::spawn(move || {
                for generation in 1..=3000 {
                    m.set_lag(&lags(generation, PARTITIONS));
                }
            })
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut scrapes = 0;
        while !writer.is_finished() && Instant::now() < deadline && scrapes < 200_000 {
            let values = lag_values(&m.render());
            assert_eq!(
                values.len(),
                PARTITIONS as usize,
                "scrape {scrapes} saw a partial set: {values:?}"
            );
            assert!(
                values.iter().all(|v| *v == values[0]),
                "scrape {scrapes} mixed two sets: {values:?}"
            );
            scrapes += 1;
        }
        writer.join().expect("writer thread");
        assert!(scrapes > 0);
    }

    async fn start(limits: Limits) -> (SocketAddr, tokio::task::JoinHandle<()>) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let task = tokio::spawn(accept_loop(l, Arc::new(Metrics::new()), limits));
        (addr, task)
    }

    /// Reads until the server closes the connection (EOF or reset) or `within` passes:
    /// what was read, and when the connection closed (None: still open).
    async fn read_until_closed(
        s: &mut tokio::net::TcpStream,
        within: Duration,
    ) -> (String, Option<Duration>) {
        let t = Instant::now();
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let left = within.saturating_sub(t.elapsed());
            match tokio::time::timeout(left, s.read(&mut buf)).await {
                Err(_) => return (String::from_utf8_lossy(&out).into(), None),
                Ok(Ok(0) | Err(_)) => {
                    return (String::from_utf8_lossy(&out).into(), Some(t.elapsed()));
                }
                Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            }
        }
    }

    const TEST_LIMITS: Limits = Limits {
        header_read: Duration::from_millis(400),
        life: Duration::from_secs(30),
        grace: Duration::from_secs(1),
        connections: 8,
    };

    #[tokio::test]
    async fn a_partial_header_is_cut_off_at_the_header_timeout() {
        let (addr, server) = start(TEST_LIMITS).await;
        let mut ok = tokio::net::TcpStream::connect(addr).await.unwrap();
        ok.write_all(b"GET /live HTTP/1.0\r\n\r\n").await.unwrap();
        let (text, closed) = read_until_closed(&mut ok, Duration::from_secs(5)).await;
        assert!(
            text.starts_with("HTTP/1.0 200") && text.ends_with("live\n"),
            "{text}"
        );
        assert!(closed.is_some());

        let mut slow = tokio::net::TcpStream::connect(addr).await.unwrap();
        let t = Instant::now();
        slow.write_all(b"GET /metrics HTTP/1.1\r\nHost: a\r\n")
            .await
            .unwrap();
        let (text, closed) = read_until_closed(&mut slow, Duration::from_secs(5)).await;
        let closed = closed.expect("a client sending half a header is disconnected");
        assert!(
            closed >= Duration::from_millis(300) && t.elapsed() < Duration::from_secs(3),
            "closed after {closed:?}"
        );
        assert!(!text.contains("200"), "{text}");
        server.abort();
    }

    /// Anyone who can reach the port can hold connections open without a word: the kubelet's
    /// probes must still get answers (else liveness fails and the pod restarts in a loop).
    /// Production limits, 100 idle connections (64 slots), then /live and /ready.
    #[tokio::test]
    async fn probes_answer_while_more_idle_connections_than_slots_are_held() {
        const IDLE: usize = 100;
        let (addr, server) = start(LIMITS).await;
        let mut idle = Vec::with_capacity(IDLE);
        for _ in 0..IDLE {
            idle.push(tokio::net::TcpStream::connect(addr).await.unwrap());
        }
        for (path, status) in [("/live", "200"), ("/ready", "503")] {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())
                .await
                .unwrap();
            let (text, closed) = read_until_closed(&mut s, Duration::from_secs(2)).await;
            assert!(
                text.starts_with(&format!("HTTP/1.0 {status}")) && closed.is_some(),
                "{path} with {IDLE} idle connections open: {text:?}"
            );
        }
        // The oldest idle connections made room; the newest are still open.
        let (_, oldest) = read_until_closed(&mut idle[0], Duration::from_secs(1)).await;
        assert!(oldest.is_some(), "the oldest idle connection is closed");
        let (_, newest) = read_until_closed(&mut idle[IDLE - 1], Duration::from_millis(200)).await;
        assert!(newest.is_none(), "the newest idle connection is still open");
        drop(idle);
        server.abort();
    }

    #[tokio::test]
    async fn an_idle_keep_alive_connection_is_closed_at_the_end_of_its_life() {
        let limits = Limits {
            header_read: Duration::from_secs(5),
            life: Duration::from_millis(600),
            ..TEST_LIMITS
        };
        let (addr, server) = start(limits).await;
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /ready HTTP/1.1\r\nHost: a\r\n\r\n")
            .await
            .unwrap();
        let (text, closed) = read_until_closed(&mut s, Duration::from_secs(4)).await;
        assert!(text.starts_with("HTTP/1.1 503"), "{text}");
        let closed = closed.expect("the connection is closed at the end of its life");
        assert!(
            closed >= Duration::from_millis(500),
            "closed after {closed:?}"
        );
        server.abort();
    }
}
