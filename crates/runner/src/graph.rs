//! The inference graph: nodes with their model clients, and how a request walks them (Seldon
//! orchestrator semantics). Payloads travel as they came (JSON or protobuf) and are transcoded
//! only where a node's transport needs the other form; the answer leaves in the input's form.

use std::{borrow::Cow, sync::Arc, time::Duration};

use bytes::Bytes;
use codec::{
    CodecError, Hints, NodeType, Protocol, Transcoder, Transport,
    chain::{chain_json, chain_proto, name_model, seldon_message_list},
    grpc_method,
    protocol::{SELDON_MESSAGE, default_request},
    rest_path,
};
use futures::future::BoxFuture;
use serde_json::Value;

use crate::{
    config::{Config, Node},
    logger::{PayloadLogger, Source},
    meta::{RecordMeta, set_traceparent},
    metrics::Metrics,
    model::{GrpcClient, ModelError, Reply, RestClient},
    otel::Tracing,
};

const SELDON_MESSAGE_LIST: &str = "seldon.protos.SeldonMessageList";

/// A payload between nodes.
#[derive(Clone, Debug)]
pub enum Msg {
    Json(Bytes),
    Proto {
        name: Cow<'static, str>,
        bytes: Bytes,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error(transparent)]
    Codec(#[from] CodecError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("router {node} chose branch {branch}, which does not exist")]
    BadRoute { node: String, branch: i64 },
    #[error("stopped while retrying: {0}")]
    Stopped(ModelError),
    #[error("gave up after {attempts} attempts while the model {alive}: {last}")]
    GaveUp {
        attempts: u32,
        /// What showed the model alive meanwhile (or that a batch is split).
        alive: &'static str,
        last: ModelError,
    },
}

impl CallError {
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Codec(e) => e.kind(),
            Self::Model(e) => e.kind(),
            Self::BadRoute { .. } => "bad-route",
            Self::Stopped(_) => "stopped",
            Self::GaveUp { last, .. } => last.kind(),
        }
    }
}

enum Client {
    Rest(RestClient),
    Grpc(GrpcClient),
}

struct NodeRt {
    cfg: Node,
    /// None for a node that calls nothing (RANDOM_ABTEST, or no type and no methods).
    client: Option<Client>,
    children: Vec<NodeRt>,
    /// Transcoding hints for this node, [columnar, row format] (made once, not per record).
    hints: [Hints; 2],
    /// RANDOM_ABTEST: the share of the first child.
    ab_ratio: Option<f64>,
    /// The REST path of the predict call instead of the protocol's (`--model-path`, root only).
    model_path: Option<String>,
    /// `logger`: its client, whether requests and answers are logged.
    logger: Option<(RestClient, bool, bool)>,
}

pub struct Graph {
    root: NodeRt,
    /// OpenTelemetry export (None: off).
    tracing: Option<Arc<Tracing>>,
    /// Sends the payloads of nodes with a `logger` (None: no node has one).
    payload_logger: Option<PayloadLogger>,
    /// More than one node: each call names its node's model, whatever the record names.
    multi_node: bool,
    protocol: Protocol,
    routing_injection: bool,
    transcoder: Transcoder,
    retry_max_backoff: Duration,
    max_attempts: u32,
    /// Successful model calls so far: evidence that the model is up while a record keeps failing.
    successes: std::sync::atomic::AtomicU64,
    /// Records (or batches) in the graph at once (`--max-concurrency`), if limited.
    concurrency: Option<Arc<tokio::sync::Semaphore>>,
    metrics: Arc<Metrics>,
    stop: tokio::sync::watch::Receiver<bool>,
}

fn build(n: &Node, cfg: &Config) -> anyhow::Result<NodeRt> {
    let timeout = cfg.model_timeout;
    let client = match (n.makes_calls(), n.transport) {
        (false, _) => None,
        (true, Transport::Rest) => Some(Client::Rest(RestClient::new(&n.url, timeout, None))),
        (true, Transport::Grpc) => Some(Client::Grpc(GrpcClient::new(&n.url, timeout, None)?)),
    };
    let hints = |row| Hints {
        model_name: Some(n.name.clone()),
        model_version: None,
        tf_input_name: cfg.tf_input_name.clone(),
        tf_row_format: row,
    };
    Ok(NodeRt {
        hints: [hints(false), hints(true)],
        ab_ratio: if n.is_ab_test() {
            Some(crate::config::ab_ratio(n)?)
        } else {
            None
        },
        model_path: None,
        logger: n.logger.as_ref().map(|l| {
            let url = l.url.as_deref().unwrap_or(&cfg.logger_default_endpoint);
            (PayloadLogger::client(url), l.log_request, l.log_response)
        }),
        cfg: n.clone(),
        client,
        children: n
            .children
            .iter()
            .map(|c| build(c, cfg))
            .collect::<anyhow::Result<_>>()?,
    })
}

/// A payload with the protobuf name of its JSON form's message, when known (a REST answer
/// returned to a record that came as protobuf is transcoded into it).
type Answer = (Msg, Option<&'static str>);

impl Graph {
    pub fn new(
        tracing: Option<Arc<Tracing>>,
        cfg: &Config,
        transcoder: Transcoder,
        metrics: Arc<Metrics>,
        stop: tokio::sync::watch::Receiver<bool>,
    ) -> anyhow::Result<Self> {
        fn any_logger(n: &Node) -> bool {
            n.logger.is_some() || n.children.iter().any(any_logger)
        }
        Ok(Self {
            tracing,
            payload_logger: any_logger(&cfg.graph).then(|| {
                let (deployment, namespace, predictor) = cfg.deployment.clone();
                PayloadLogger::start(
                    Source {
                        deployment,
                        namespace,
                        predictor,
                        protocol: cfg.protocol.to_string(),
                    },
                    metrics.clone(),
                )
            }),
            root: {
                let mut root = build(&cfg.graph, cfg)?;
                root.model_path = cfg.model_path.clone();
                root
            },
            multi_node: !cfg.graph.children.is_empty(),
            protocol: cfg.protocol,
            routing_injection: cfg.routing_injection,
            transcoder,
            retry_max_backoff: cfg.retry_max_backoff,
            max_attempts: cfg.max_attempts,
            successes: std::sync::atomic::AtomicU64::new(0),
            concurrency: cfg
                .max_concurrency
                .map(|n| Arc::new(tokio::sync::Semaphore::new(n))),
            metrics,
            stop,
        })
    }

    pub fn tracing(&self) -> Option<&Arc<Tracing>> {
        self.tracing.as_ref()
    }

    pub fn transcoder(&self) -> &Transcoder {
        &self.transcoder
    }

    /// Runs the graph for one record; the answer has the input's form (JSON in, JSON out;
    /// protobuf in, protobuf out with its message name).
    pub async fn infer(&self, input: Msg, rm: &RecordMeta) -> Result<Msg, CallError> {
        self.walk(input, rm, false).await
    }

    /// Runs the graph for a merged batch: a failure that may be a record's fault (a timeout, a
    /// lost connection, 502/504) ends it at once with [`CallError::GaveUp`], so its records can
    /// run alone (the healthy ones answered, the suspect isolated) instead of the whole batch
    /// retrying.
    pub async fn infer_batch(&self, input: Msg, rm: &RecordMeta) -> Result<Msg, CallError> {
        self.walk(input, rm, true).await
    }

    async fn walk(&self, input: Msg, rm: &RecordMeta, batch: bool) -> Result<Msg, CallError> {
        let w = Walk {
            place: match &self.concurrency {
                Some(sem) => Some(Place::take(sem.clone()).await),
                None => None,
            },
            batch,
        };
        let row_format = self.protocol == Protocol::Tensorflow
            && matches!(&input, Msg::Json(b) if memfind(b, b"\"instances\""));
        let hints = &self.root.hints[usize::from(row_format)];
        let want_json = matches!(input, Msg::Json(_));
        let (out, resp_name) = self
            .predict(&self.root, (input, None), rm, &w, row_format)
            .await?;
        Ok(match (out, want_json) {
            (Msg::Json(b), true) => Msg::Json(b),
            (Msg::Proto { name, bytes }, true) => {
                Msg::Json(
                    self.transcoder
                        .proto_to_json(self.protocol, &name, &bytes, hints)?,
                )
            }
            (p @ Msg::Proto { .. }, false) => p,
            (Msg::Json(b), false) => {
                let name = resp_name.ok_or_else(|| {
                    CodecError::Transcode(
                        "the model's JSON answer has no protobuf form to return".into(),
                    )
                })?;
                Msg::Proto {
                    bytes: self
                        .transcoder
                        .json_to_proto(self.protocol, name, &b, hints)?,
                    name: Cow::Borrowed(name),
                }
            }
        })
    }

    /// One node as Seldon's executor runs it (`PredictorProcess.Predict`): its input call
    /// (predict for a MODEL, transform-input for a TRANSFORMER or TRANSFORM_INPUT method), then
    /// its children (routed, then aggregated), then its transform-output call.
    fn predict<'a>(
        &'a self,
        node: &'a NodeRt,
        msg: Answer,
        rm: &'a RecordMeta,
        w: &'a Walk,
        row: bool,
    ) -> BoxFuture<'a, Result<Answer, CallError>> {
        Box::pin(async move {
            self.log_payload(node, "request", &msg.0, rm);
            let msg = match node.cfg.input_call() {
                Some(kind) => {
                    rm.routed(&node.cfg.name, -1);
                    let m = self.chain(msg, node)?;
                    self.call(node, kind, m, rm, w, row).await?
                }
                None => msg,
            };
            let msg = self.children(node, msg, rm, w, row).await?;
            let msg = if node.cfg.calls_transform_output() {
                let m = self.chain(msg, node)?;
                self.call(node, NodeType::OutputTransformer, m, rm, w, row)
                    .await?
            } else {
                msg
            };
            let msg = if self.routing_injection {
                self.inject_routing(msg, rm)?
            } else {
                msg
            };
            self.log_payload(node, "response", &msg.0, rm);
            Ok(msg)
        })
    }

    /// Queues a node's request or answer for its `logger` (unless the record says
    /// Seldon-Skip-Logging).
    fn log_payload(&self, node: &NodeRt, kind: &'static str, msg: &Msg, rm: &RecordMeta) {
        let (Some(l), Some((client, req, resp))) = (&self.payload_logger, &node.logger) else {
            return;
        };
        if rm.skip_logging || !(if kind == "request" { *req } else { *resp }) {
            return;
        }
        let (json, body) = match msg {
            Msg::Json(b) => (true, b.clone()),
            Msg::Proto { bytes, .. } => (false, bytes.clone()),
        };
        l.log(client, kind, &node.cfg.name, &rm.request_id, json, body);
    }

    /// SELDON_ENABLE_ROUTING_INJECTION: the routes taken so far as the answer's meta.routing,
    /// where the answer has a meta object (as Seldon's `InsertRouteToSeldonPredictPayload`).
    fn inject_routing(&self, (msg, name): Answer, rm: &RecordMeta) -> Result<Answer, CallError> {
        if self.protocol != Protocol::Seldon {
            return Ok((msg, name));
        }
        let routing: serde_json::Map<String, Value> = rm
            .routing()
            .into_iter()
            .map(|(k, v)| (k, Value::from(v)))
            .collect();
        let was_proto = match &msg {
            Msg::Proto { name, .. } => Some(name.clone()),
            Msg::Json(_) => None,
        };
        let json = self.as_json(msg.clone())?;
        let Ok(mut v) = serde_json::from_slice::<Value>(&json) else {
            return Ok((msg, name));
        };
        let Some(meta) = v.get_mut("meta").and_then(Value::as_object_mut) else {
            return Ok((msg, name));
        };
        meta.insert("routing".into(), Value::Object(routing));
        let out = match was_proto {
            Some(n) => Msg::Proto {
                bytes: self.transcoder.from_proto_json(&n, v)?,
                name: n,
            },
            None => Msg::Json(Bytes::from(serde_json::to_vec(&v).expect("serializes"))),
        };
        Ok((out, name))
    }

    /// Seldon's `Chain` before a predict or transform call: the previous call's answer made
    /// into a request (tensorflow and v2; seldon messages pass unchanged). The record itself
    /// (no call yet) is passed as it is.
    fn chain(&self, (msg, name): Answer, node: &NodeRt) -> Result<Msg, CallError> {
        if name.is_none() || self.protocol == Protocol::Seldon {
            return Ok(msg);
        }
        Ok(match msg {
            Msg::Json(b) => Msg::Json(chain_json(self.protocol, &b)?.unwrap_or(b)),
            Msg::Proto { name, bytes } => {
                match chain_proto(self.protocol, &name, &bytes, &node.cfg.name)? {
                    Some((req, b)) => Msg::Proto {
                        name: Cow::Borrowed(req),
                        bytes: b,
                    },
                    None => Msg::Proto { name, bytes },
                }
            }
        })
    }

    /// `predictChildren`: the route (-1 all children, -2 the message unchanged, else one
    /// child), then the aggregate call or the first child's answer.
    async fn children(
        &self,
        node: &NodeRt,
        msg: Answer,
        rm: &RecordMeta,
        w: &Walk,
        row: bool,
    ) -> Result<Answer, CallError> {
        if node.children.is_empty() {
            return Ok(msg);
        }
        let route = if node.cfg.calls_route() {
            let (r, _) = self
                .call(node, NodeType::Router, msg.0.clone(), rm, w, row)
                .await?;
            self.route_of(node, &r)?
        } else if let Some(ratio) = node.ab_ratio {
            if fastrand::f64() < ratio { 0 } else { 1 }
        } else {
            -1
        };
        rm.routed(&node.cfg.name, route);
        let answers = match route {
            -1 => {
                // All children at once; the first failure in child order is the answer. Each
                // branch holds a share of the record's place (given up only while every
                // running branch waits out a retry backoff).
                let n = node.children.len();
                w.fork(n);
                let all = futures::future::join_all(node.children.iter().map(|c| async {
                    let r = self.predict(c, msg.clone(), rm, w, row).await;
                    w.branch_done();
                    r
                }))
                .await;
                w.join();
                all.into_iter().collect::<Result<Vec<_>, _>>()?
            }
            -2 => return Ok(msg),
            i => {
                let child = usize::try_from(i)
                    .ok()
                    .and_then(|i| node.children.get(i))
                    .ok_or_else(|| CallError::BadRoute {
                        node: node.cfg.name.clone(),
                        branch: i,
                    })?;
                vec![self.predict(child, msg, rm, w, row).await?]
            }
        };
        if node.cfg.calls_aggregate() {
            rm.routed(&node.cfg.name, -1);
            self.aggregate(node, answers, rm, w, row).await
        } else {
            Ok(answers.into_iter().next().expect("at least one child"))
        }
    }

    /// The aggregate call: over REST a bare JSON list of the answers (as Seldon's executor
    /// sends it), over gRPC a SeldonMessageList.
    async fn aggregate(
        &self,
        node: &NodeRt,
        answers: Vec<Answer>,
        rm: &RecordMeta,
        w: &Walk,
        row: bool,
    ) -> Result<Answer, CallError> {
        let list = match node.client {
            Some(Client::Grpc(_)) => {
                let encoded = answers
                    .into_iter()
                    .map(|(m, _)| match m {
                        Msg::Proto { bytes, .. } => Ok(bytes),
                        Msg::Json(b) => self.transcoder.json_to_proto(
                            self.protocol,
                            SELDON_MESSAGE,
                            &b,
                            &Hints::default(),
                        ),
                    })
                    .collect::<Result<Vec<Bytes>, _>>()?;
                Msg::Proto {
                    name: Cow::Borrowed(SELDON_MESSAGE_LIST),
                    bytes: seldon_message_list(encoded.iter().map(|b| &b[..])),
                }
            }
            _ => {
                let mut out = Vec::from(&b"["[..]);
                for (i, (m, _)) in answers.into_iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    out.extend_from_slice(&self.as_json(m)?);
                }
                out.push(b']');
                Msg::Json(Bytes::from(out))
            }
        };
        self.call(node, NodeType::Combiner, list, rm, w, row).await
    }

    fn as_json(&self, m: Msg) -> Result<Bytes, CallError> {
        Ok(match m {
            Msg::Json(b) => b,
            Msg::Proto { name, bytes } => {
                self.transcoder
                    .proto_to_json(self.protocol, &name, &bytes, &Hints::default())?
            }
        })
    }

    /// A router's answer as Seldon reads it (`ExtractRouteFromSeldonMessage`): the first
    /// value of data.ndarray (or of its first row), data.tensor.values or
    /// data.tftensor.int_val; a bare JSON array of numbers; no data at all means -1.
    fn route_of(&self, node: &NodeRt, m: &Msg) -> Result<i64, CallError> {
        let b = self.as_json(m.clone())?;
        let v: Value = serde_json::from_slice(&b)
            .map_err(|e| CallError::Codec(CodecError::MalformedJson(e.to_string())))?;
        let first = |a: Option<&Value>| -> Option<Option<f64>> {
            let a = a?.as_array()?;
            // Seldon reads numbers (a string or bool is 0); an empty list or row has none.
            let n = |x: &Value| x.as_f64().or(Some(0.0));
            Some(a.first().and_then(|x| match x {
                Value::Array(row) => row.first().and_then(n),
                x => n(x),
            }))
        };
        let picked = match &v {
            Value::Array(_) => first(Some(&v)),
            Value::Object(o) => match o.get("data") {
                None | Some(Value::Null) => Some(Some(-1.0)),
                Some(d) => first(d.get("ndarray"))
                    .or_else(|| first(d.pointer("/tensor/values")))
                    .or_else(|| first(d.pointer("/tftensor/intVal")))
                    .or_else(|| first(d.pointer("/tftensor/int_val")))
                    .or_else(|| {
                        // No tensor in the data (names only, or strData): Seldon's -1.
                        (!["ndarray", "tensor", "tftensor"]
                            .iter()
                            .any(|k| d.get(k).is_some()))
                        .then_some(Some(-1.0))
                    }),
            },
            _ => None,
        };
        match picked {
            Some(Some(f)) if f.is_finite() => Ok(f as i64),
            _ => Err(CallError::Codec(CodecError::WrongProtocol {
                protocol: Protocol::Seldon,
                why: format!(
                    "router {} answered no branch index (want e.g. {{\"data\":{{\"ndarray\":[[1]]}}}})",
                    node.cfg.name
                ),
            })),
        }
    }

    /// One call of a node (`kind`: predict, transform-input, transform-output, route or
    /// aggregate), in the form its transport needs, with the record's headers, retrying
    /// retryable failures.
    async fn call(
        &self,
        node: &NodeRt,
        kind: NodeType,
        msg: Msg,
        rm: &RecordMeta,
        w: &Walk,
        row: bool,
    ) -> Result<Answer, CallError> {
        let hints = &node.hints[usize::from(row)];
        let client = node.client.as_ref().ok_or_else(|| {
            CodecError::Transcode(format!("graph node {} has no endpoint", node.cfg.name))
        })?;
        // With export on, each call is a span of its own and its traceparent names it.
        let span = match (&self.tracing, &rm.span) {
            (Some(t), Some(r)) => Some(r.call(t, &node.cfg.name, call_name(kind))),
            _ => None,
        };
        let traced;
        let headers = match &span {
            Some(s) => {
                let mut h = rm.to_model.clone();
                set_traceparent(&mut h, &s.traceparent());
                traced = h;
                &traced
            }
            None => &rm.to_model,
        };
        let out = self
            .send(node, client, kind, msg, rm, w, headers, hints)
            .await;
        if let Some(s) = span {
            s.end(out.as_ref().err().map(|e| e.to_string()).as_deref());
        }
        out
    }

    #[allow(clippy::too_many_arguments)]
    async fn send(
        &self,
        node: &NodeRt,
        client: &Client,
        kind: NodeType,
        msg: Msg,
        rm: &RecordMeta,
        w: &Walk,
        headers: &http::HeaderMap,
        hints: &Hints,
    ) -> Result<Answer, CallError> {
        let p = self.protocol;
        match client {
            Client::Rest(c) => {
                let (json, req) = match msg {
                    Msg::Json(b) => (b, Cow::Borrowed(default_request(p, kind))),
                    Msg::Proto { name, bytes } => (
                        self.transcoder.proto_to_json(p, &name, &bytes, hints)?,
                        name,
                    ),
                };
                let path = match &node.model_path {
                    Some(path) if kind == NodeType::Model && req == default_request(p, kind) => {
                        path.clone()
                    }
                    _ => rest_path(
                        p,
                        kind,
                        &node.cfg.name,
                        hints.model_version.as_deref(),
                        &req,
                    ),
                };
                let resp_name = grpc_method(p, kind, &req).ok().map(|m| m.response);
                let reply = self
                    .retrying(node, client, w, || {
                        c.post_json(&path, json.clone(), headers)
                    })
                    .await?;
                rm.answered_with(&reply.headers);
                Ok((Msg::Json(reply.body), resp_name))
            }
            Client::Grpc(c) => {
                let (bytes, req) = match msg {
                    Msg::Proto { name, bytes } => (bytes, name),
                    Msg::Json(b) => {
                        let req = default_request(p, kind);
                        (
                            self.transcoder.json_to_proto(p, req, &b, hints)?,
                            Cow::Borrowed(req),
                        )
                    }
                };
                let method = grpc_method(p, kind, &req)?;
                // Each node is called by its own name in a graph; a lone model keeps the
                // name a record gives (filled in where it gives none).
                let bytes =
                    name_model(&req, &bytes, &node.cfg.name, !self.multi_node)?.unwrap_or(bytes);
                let reply = self
                    .retrying(node, client, w, || {
                        c.unary(method.path, bytes.clone(), headers)
                    })
                    .await?;
                rm.answered_with(&reply.headers);
                Ok((
                    Msg::Proto {
                        name: Cow::Borrowed(method.response),
                        bytes: reply.body,
                    },
                    Some(method.response),
                ))
            }
        }
    }

    /// Retries retryable failures with capped exponential backoff until success, a final
    /// error, or shutdown; the record's place among `--max-concurrency` is given up while it
    /// waits out a backoff. Poison isolation: failures that may be this request's fault (see
    /// [`ModelError::may_be_the_request`]) count as attempts. A batch gives up at the first
    /// (its records then run alone). A record gives up after `max_attempts` of them if the
    /// model showed it is alive meanwhile: it answered another call since this one started, or
    /// it answers its health check ([`Graph::probe`]). Otherwise the model is down for
    /// everyone and the call keeps waiting (nothing is lost).
    async fn retrying<F, Fut>(
        &self,
        node: &NodeRt,
        client: &Client,
        w: &Walk,
        mut f: F,
    ) -> Result<Reply, CallError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<Reply, ModelError>>,
    {
        use std::sync::atomic::Ordering::Relaxed;
        let mut backoff =
            kafka_io::backoff::Backoff::new(Duration::from_millis(50), self.retry_max_backoff);
        let mut stop = self.stop.clone();
        let mut attempts = 0u32;
        // Calls the model answered since this one started: evidence that the model is up.
        let successes_at_start = self.successes.load(Relaxed);
        loop {
            let start = std::time::Instant::now();
            let r = f().await;
            self.metrics
                .model_duration
                .observe(start.elapsed().as_secs_f64());
            match r {
                Ok(b) => {
                    self.successes.fetch_add(1, Relaxed);
                    return Ok(b);
                }
                Err(e) if e.is_retryable() => {
                    let suspect = e.may_be_the_request();
                    if suspect {
                        attempts += 1;
                        if w.batch {
                            return Err(CallError::GaveUp {
                                attempts,
                                alive: "may hang on one of the batch's records (split)",
                                last: e,
                            });
                        }
                    }
                    // Others may run meanwhile (the probe and the backoff need no place).
                    w.pause();
                    if suspect && attempts >= self.max_attempts {
                        let alive = if self.successes.load(Relaxed) > successes_at_start {
                            Some("answered other records")
                        } else if self.probe(node, client).await {
                            Some("answered its health check")
                        } else {
                            None
                        };
                        if let Some(alive) = alive {
                            return Err(CallError::GaveUp {
                                attempts,
                                alive,
                                last: e,
                            });
                        }
                    }
                    self.metrics.record("retry");
                    let wait = backoff.next_wait();
                    if crate::ratelog::CALL_RETRIED.admit(e.kind(), None) {
                        tracing::warn!(error = %crate::pipeline::printable(&e), retry_in = ?wait, "model call failed, retrying");
                    }
                    if *stop.borrow() {
                        return Err(CallError::Stopped(e));
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = stop.changed() => return Err(CallError::Stopped(e)),
                    }
                    w.resume().await;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Whether the node's model server says it is ready (within `--model-timeout`): see
    /// [`Graph::readiness_of`].
    async fn probe(&self, node: &NodeRt, client: &Client) -> bool {
        let ok = self.readiness_of(node, client).await.is_ok();
        tracing::info!(model = %node.cfg.name, ready = ok, "health check of a model that keeps failing one record");
        ok
    }

    /// Asks every node of the graph that calls a model server whether it is ready (for
    /// `kafka-infer check`): each node's name, URL (without userinfo), the endpoint asked, and
    /// why it is not ready.
    pub async fn readiness(&self) -> Vec<NodeReadiness> {
        fn nodes<'a>(n: &'a NodeRt, out: &mut Vec<&'a NodeRt>) {
            out.push(n);
            for c in &n.children {
                nodes(c, out);
            }
        }
        let mut all = Vec::new();
        nodes(&self.root, &mut all);
        let mut out = Vec::new();
        for n in all {
            let Some(client) = &n.client else { continue };
            let result = self.readiness_of(n, client).await;
            out.push(NodeReadiness {
                node: n.cfg.name.clone(),
                url: crate::config::without_userinfo(&n.cfg.url).into_owned(),
                endpoint: self.readiness_endpoint(n, client),
                result,
            });
        }
        out
    }

    /// What [`Graph::readiness_of`] asks: a REST path or a gRPC method.
    fn readiness_endpoint(&self, node: &NodeRt, client: &Client) -> String {
        match (client, self.protocol) {
            (Client::Rest(_), Protocol::V2) => "GET /v2/health/ready".to_owned(),
            (Client::Rest(_), Protocol::Tensorflow) => format!("GET /v1/models/{}", node.cfg.name),
            (Client::Rest(_), Protocol::Seldon) => "GET /health/ping".to_owned(),
            (Client::Grpc(_), Protocol::V2) => {
                "gRPC inference.GRPCInferenceService/ServerReady".to_owned()
            }
            (Client::Grpc(_), Protocol::Tensorflow) => {
                "gRPC tensorflow.serving.ModelService/GetModelStatus".to_owned()
            }
            (Client::Grpc(_), Protocol::Seldon) => "gRPC grpc.health.v1.Health/Check".to_owned(),
        }
    }

    /// Whether the node's model server says it is ready (within `--model-timeout`): REST
    /// `GET /v2/health/ready` (v2), `GET /v1/models/<name>` (tensorflow), `GET /health/ping`
    /// (seldon); gRPC `ServerReady` (v2), `ModelService/GetModelStatus` (tensorflow),
    /// `grpc.health.v1.Health/Check` (seldon). A server that does not serve it counts as not
    /// ready. Err says why.
    async fn readiness_of(&self, node: &NodeRt, client: &Client) -> Result<(), String> {
        match client {
            Client::Rest(c) => {
                let path = match self.protocol {
                    Protocol::V2 => "/v2/health/ready".to_owned(),
                    Protocol::Tensorflow => format!("/v1/models/{}", node.cfg.name),
                    Protocol::Seldon => "/health/ping".to_owned(),
                };
                c.get(&path).await.map_err(|e| e.to_string())
            }
            Client::Grpc(c) => {
                let none = http::HeaderMap::new();
                let (path, body, want): (&'static str, Bytes, Option<&[u8]>) = match self.protocol {
                    // ServerReadyResponse { ready: true }
                    Protocol::V2 => (
                        "/inference.GRPCInferenceService/ServerReady",
                        Bytes::new(),
                        Some(&[0x08, 0x01]),
                    ),
                    // GetModelStatusRequest { model_spec: { name } }: any answer is a status.
                    Protocol::Tensorflow => {
                        let name = node.cfg.name.as_bytes();
                        let mut b = Vec::with_capacity(name.len() + 6);
                        b.push(0x0a);
                        put_varint(&mut b, name.len() + 1 + varint_len(name.len()));
                        b.push(0x0a);
                        put_varint(&mut b, name.len());
                        b.extend_from_slice(name);
                        (
                            "/tensorflow.serving.ModelService/GetModelStatus",
                            Bytes::from(b),
                            None,
                        )
                    }
                    // HealthCheckResponse { status: SERVING }
                    Protocol::Seldon => (
                        "/grpc.health.v1.Health/Check",
                        Bytes::new(),
                        Some(&[0x08, 0x01]),
                    ),
                };
                match c.unary(path, body, &none).await {
                    Ok(r) if want.is_none_or(|w| r.body[..] == *w) => Ok(()),
                    Ok(_) => Err("the server answers that it is not ready".to_owned()),
                    Err(e) => Err(e.to_string()),
                }
            }
        }
    }
}

/// One graph node's readiness ([`Graph::readiness`]).
#[derive(Clone, Debug)]
pub struct NodeReadiness {
    pub node: String,
    pub url: String,
    pub endpoint: String,
    pub result: Result<(), String>,
}

fn put_varint(b: &mut Vec<u8>, mut n: usize) {
    while n >= 0x80 {
        b.push((n as u8 & 0x7f) | 0x80);
        n >>= 7;
    }
    b.push(n as u8);
}

fn varint_len(n: usize) -> usize {
    let mut b = Vec::new();
    put_varint(&mut b, n);
    b.len()
}

/// One walk of the graph (a record, or a merged batch): its place among the records in the
/// graph at once, and how its calls give up.
struct Walk {
    place: Option<Place>,
    /// A merged batch: the first failure that may be a record's fault ends it.
    batch: bool,
}

impl Walk {
    fn pause(&self) {
        if let Some(p) = &self.place {
            p.pause();
        }
    }

    async fn resume(&self) {
        if let Some(p) = &self.place {
            p.resume().await;
        }
    }

    fn fork(&self, n: usize) {
        if let Some(p) = &self.place {
            p.state().busy += n.saturating_sub(1);
        }
    }

    fn branch_done(&self) {
        if let Some(p) = &self.place {
            let mut s = p.state();
            s.busy = s.busy.saturating_sub(1);
        }
    }

    fn join(&self) {
        if let Some(p) = &self.place {
            p.state().busy += 1;
        }
    }
}

/// A walk's place among the records in the graph at once (`--max-concurrency`): held from
/// the start of the walk to its end, except while every one of its running calls waits out a
/// retry backoff (then another record may run; the place is queued for again, behind those
/// already waiting).
struct Place {
    sem: Arc<tokio::sync::Semaphore>,
    state: std::sync::Mutex<PlaceState>,
}

struct PlaceState {
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
    /// The walk's branches not waiting out a backoff (finished branches of a fork included
    /// until it joins).
    busy: usize,
}

impl Place {
    async fn take(sem: Arc<tokio::sync::Semaphore>) -> Self {
        let permit = sem.clone().acquire_owned().await.expect("never closed");
        Self {
            sem,
            state: std::sync::Mutex::new(PlaceState {
                permit: Some(permit),
                busy: 1,
            }),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, PlaceState> {
        self.state.lock().expect("not poisoned")
    }

    /// A branch starts waiting out a backoff: the last one gives the place up.
    fn pause(&self) {
        let mut s = self.state();
        s.busy = s.busy.saturating_sub(1);
        if s.busy == 0 {
            s.permit = None;
        }
    }

    /// A branch is done waiting: it needs the place again.
    async fn resume(&self) {
        {
            let mut s = self.state();
            if s.permit.is_some() {
                s.busy += 1;
                return;
            }
        }
        let p = self
            .sem
            .clone()
            .acquire_owned()
            .await
            .expect("never closed");
        let mut s = self.state();
        if s.permit.is_none() {
            s.permit = Some(p);
        }
        s.busy += 1;
    }
}

/// The call's name in spans.
fn call_name(kind: NodeType) -> &'static str {
    match kind {
        NodeType::Model => "predict",
        NodeType::Transformer => "transform-input",
        NodeType::OutputTransformer => "transform-output",
        NodeType::Router => "route",
        NodeType::Combiner => "aggregate",
    }
}

fn memfind(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn walk(sem: &Arc<tokio::sync::Semaphore>) -> impl Future<Output = Walk> {
        let sem = sem.clone();
        async move {
            Walk {
                place: Some(Place::take(sem).await),
                batch: false,
            }
        }
    }

    /// `--max-concurrency 1`: a record waiting out a backoff gives its place to another, and
    /// queues for it again when it resumes.
    #[tokio::test]
    async fn a_place_is_given_up_while_its_record_waits_out_a_backoff() {
        let sem = Arc::new(tokio::sync::Semaphore::new(1));
        let a = walk(&sem).await;
        assert_eq!(sem.available_permits(), 0, "a holds the place");
        a.pause();
        assert_eq!(sem.available_permits(), 1, "given up during the backoff");
        let b = walk(&sem).await;
        let resumed = tokio::spawn(async move {
            a.resume().await;
            a
        });
        tokio::task::yield_now().await;
        assert!(!resumed.is_finished(), "a waits for b's place");
        drop(b);
        let a = resumed.await.expect("a resumes once b is done");
        assert_eq!(sem.available_permits(), 0, "a holds it again");
        drop(a);
        assert_eq!(sem.available_permits(), 1, "freed at the end of the walk");
    }

    /// Children called at once: the record gives its place up only while every running branch
    /// waits out a backoff.
    #[tokio::test]
    async fn a_forked_walk_keeps_its_place_while_one_branch_still_runs() {
        let sem = Arc::new(tokio::sync::Semaphore::new(1));
        let w = walk(&sem).await;
        w.fork(2);
        w.pause();
        assert_eq!(sem.available_permits(), 0, "the other branch still runs");
        w.pause();
        assert_eq!(sem.available_permits(), 1, "both branches back off");
        w.resume().await;
        w.resume().await;
        assert_eq!(sem.available_permits(), 0, "one place for both branches");
        w.branch_done();
        w.branch_done();
        w.join();
        assert_eq!(sem.available_permits(), 0, "the walk goes on in its place");
        w.pause();
        assert_eq!(sem.available_permits(), 1);
    }
}
