//! Metrics (Prometheus text on /metrics) and health (/live, /ready), served by a small hyper
//! server on --metrics-addr.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::Full;
use hyper::{server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
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

pub struct Metrics {
    registry: Registry,
    pub lag: Family<LagLabels, Gauge>,
    pub model_duration: Histogram,
    pub in_flight: Gauge,
    pub ready: AtomicBool,
    /// The three result series, made once (no allocation per record).
    by_result: [(&'static str, Counter); 3],
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let lag = Family::<LagLabels, Gauge>::default();
        let records = Family::<ResultLabels, Counter>::default();
        let model_duration = Histogram::new([
            0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
        ]);
        let in_flight = Gauge::default();
        registry.register(
            "kafka_infer_consumer_lag",
            "Records not yet committed per partition (high watermark - committed offset)",
            lag.clone(),
        );
        registry.register(
            "kafka_infer_records",
            "Input records by result: ok, error (answered with an error record), retry (model call retries)",
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
        let by_result = ["ok", "error", "retry"].map(|r| {
            let c = records
                .get_or_create(&ResultLabels {
                    result: r.to_owned(),
                })
                .clone();
            (r, c)
        });
        Self {
            by_result,
            registry,
            lag,
            model_duration,
            in_flight,
            ready: AtomicBool::new(false),
        }
    }

    /// Counts one record (or retry) under `result`: ok, error or retry.
    pub fn record(&self, result: &str) {
        if let Some((_, c)) = self.by_result.iter().find(|(r, _)| *r == result) {
            c.inc();
        }
    }

    /// Records answered so far (the `ok` series).
    pub fn ok_total(&self) -> u64 {
        self.by_result[0].1.get()
    }

    /// Replaces the lag series with the current assignment's partitions.
    pub fn set_lag(&self, lags: &[kafka_io::PartitionLag]) {
        self.lag.clear();
        for l in lags {
            self.lag
                .get_or_create(&LagLabels {
                    topic: l.topic.clone(),
                    partition: l.partition.to_string(),
                })
                .set(l.lag);
        }
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

/// Serves /metrics, /live and /ready until the task is dropped.
pub async fn serve(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("--metrics-addr {addr}: {e}"))?;
    tracing::info!(%addr, "metrics and health listening");
    Ok(tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let m = metrics.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let m = m.clone();
                    async move {
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
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    }))
}
