//! The payload logger of graph nodes with a `logger` (Seldon's request logging): a node's
//! request and answer sent as binary-mode CloudEvents to the logger's URL, off the record's
//! path. Events wait in a queue bounded in count (10,000) and payload bytes (64 MiB); past
//! either they are dropped (counted), never holding up records.

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue};
use tokio::sync::mpsc;

use crate::{metrics::Metrics, model::RestClient};

/// Events waiting to be sent, at most.
const QUEUE: usize = 10_000;
/// Payload bytes waiting to be sent, at most (past it, events are dropped).
const QUEUE_BYTES: usize = 64 << 20;
/// Senders at once.
const WORKERS: usize = 4;

/// One event: where it goes, its CloudEvents headers, its payload.
struct Event {
    client: RestClient,
    headers: HeaderMap,
    content_type: &'static str,
    body: Bytes,
}

/// What every event of this process says about where it comes from.
pub struct Source {
    pub deployment: String,
    pub namespace: String,
    pub predictor: String,
    pub protocol: String,
}

#[derive(Clone)]
pub struct PayloadLogger {
    tx: mpsc::Sender<Event>,
    /// Payload bytes queued or being sent.
    queued_bytes: Arc<std::sync::atomic::AtomicUsize>,
    source: Arc<Source>,
    metrics: Arc<Metrics>,
}

impl PayloadLogger {
    pub fn start(source: Source, metrics: Arc<Metrics>) -> Self {
        let (tx, rx) = mpsc::channel::<Event>(QUEUE);
        let rx = Arc::new(tokio::sync::Mutex::new(rx));
        let queued_bytes = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        for _ in 0..WORKERS {
            let (rx, metrics, queued) = (rx.clone(), metrics.clone(), queued_bytes.clone());
            tokio::spawn(async move {
                loop {
                    let Some(e) = rx.lock().await.recv().await else {
                        return;
                    };
                    let len = e.body.len();
                    let sent = e.client.post("", e.body, e.content_type, &e.headers).await;
                    queued.fetch_sub(len, std::sync::atomic::Ordering::Relaxed);
                    match sent {
                        Ok(_) => metrics.logger_event("sent"),
                        Err(err) => {
                            metrics.logger_event("failed");
                            if crate::ratelog::LOGGER_FAILED.admit(err.kind(), None) {
                                tracing::warn!(error = %crate::pipeline::printable(&err), "payload logger: event not delivered");
                            }
                        }
                    }
                }
            });
        }
        Self {
            tx,
            queued_bytes,
            source: Arc::new(source),
            metrics,
        }
    }

    /// A client for a logger URL (one per graph node with a logger).
    pub fn client(url: &str) -> RestClient {
        RestClient::new(url, Duration::from_secs(60), None)
    }

    /// Queues one event: `kind` is request or response; `json` tells the payload's form.
    pub fn log(
        &self,
        client: &RestClient,
        kind: &'static str,
        node: &str,
        request_id: &str,
        json: bool,
        body: Bytes,
    ) {
        let mut h = HeaderMap::new();
        let mut put = |k: &'static str, v: &str| {
            if let Ok(v) = HeaderValue::from_str(v) {
                h.insert(HeaderName::from_static(k), v);
            }
        };
        put("ce-specversion", "1.0");
        put("ce-id", &crate::meta::new_request_id());
        put(
            "ce-type",
            match kind {
                "request" => "io.seldon.serving.inference.request",
                _ => "io.seldon.serving.inference.response",
            },
        );
        put(
            "ce-source",
            &format!("kafka-infer/{}", self.source.deployment),
        );
        put("ce-modelid", node);
        put("ce-requestid", request_id);
        put("ce-inferenceservicename", &self.source.deployment);
        put("ce-namespace", &self.source.namespace);
        put("ce-endpoint", &self.source.predictor);
        put("ce-protocol", &self.source.protocol);
        use std::sync::atomic::Ordering::Relaxed;
        if self.queued_bytes.fetch_add(body.len(), Relaxed) + body.len() > QUEUE_BYTES {
            self.queued_bytes.fetch_sub(body.len(), Relaxed);
            self.metrics.logger_event("dropped");
            return;
        }
        let len = body.len();
        let e = Event {
            client: client.clone(),
            headers: h,
            content_type: if json {
                "application/json"
            } else {
                "application/protobuf"
            },
            // A copy: a slice of a fetched batch would keep the whole batch alive.
            body: Bytes::copy_from_slice(&body),
        };
        if self.tx.try_send(e).is_err() {
            self.queued_bytes.fetch_sub(len, Relaxed);
            self.metrics.logger_event("dropped");
        }
    }
}
