//! The inference graph: nodes with their model clients, and how a request walks them (Seldon
//! orchestrator semantics). Payloads travel as they came (JSON or protobuf) and are transcoded
//! only where a node's transport needs the other form; the answer leaves in the input's form.

use std::{borrow::Cow, sync::Arc, time::Duration};

use bytes::Bytes;
use codec::{
    CodecError, Hints, NodeType, Protocol, Transcoder, Transport, grpc_method,
    protocol::default_request, rest_path,
};
use futures::future::BoxFuture;
use serde_json::Value;

use crate::{
    config::{Config, Node},
    metrics::Metrics,
    model::{GrpcClient, ModelError, RestClient},
};

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
    #[error("gave up after {attempts} attempts while the model answered other records: {last}")]
    GaveUp { attempts: u32, last: ModelError },
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
    client: Client,
    children: Vec<NodeRt>,
    /// Transcoding hints for this node, [columnar, row format] (made once, not per record).
    hints: [Hints; 2],
    /// The REST path of the protocol's default request (most records take it).
    default_path: String,
}

pub struct Graph {
    root: NodeRt,
    protocol: Protocol,
    transcoder: Transcoder,
    retry_max_backoff: Duration,
    max_attempts: u32,
    /// Successful model calls so far: evidence that the model is up while a record keeps failing.
    successes: std::sync::atomic::AtomicU64,
    metrics: Arc<Metrics>,
    stop: tokio::sync::watch::Receiver<bool>,
}

fn build(n: &Node, cfg: &Config) -> anyhow::Result<NodeRt> {
    let timeout = cfg.model_timeout;
    let client = match n.transport {
        Transport::Rest => Client::Rest(RestClient::new(&n.url, timeout, None)),
        Transport::Grpc => Client::Grpc(GrpcClient::new(&n.url, timeout, None)?),
    };
    let hints = |row| Hints {
        model_name: Some(n.name.clone()),
        model_version: None,
        tf_input_name: cfg.tf_input_name.clone(),
        tf_row_format: row,
    };
    let p = cfg.protocol;
    Ok(NodeRt {
        default_path: rest_path(
            p,
            n.node_type,
            &n.name,
            None,
            default_request(p, n.node_type),
        ),
        hints: [hints(false), hints(true)],
        cfg: n.clone(),
        client,
        children: n
            .children
            .iter()
            .map(|c| build(c, cfg))
            .collect::<anyhow::Result<_>>()?,
    })
}

impl Graph {
    pub fn new(
        cfg: &Config,
        transcoder: Transcoder,
        metrics: Arc<Metrics>,
        stop: tokio::sync::watch::Receiver<bool>,
    ) -> anyhow::Result<Self> {
        Ok(Self {
            root: {
                let mut root = build(&cfg.graph, cfg)?;
                if let Some(path) = &cfg.model_path {
                    root.default_path = path.clone();
                }
                root
            },
            protocol: cfg.protocol,
            transcoder,
            retry_max_backoff: cfg.retry_max_backoff,
            max_attempts: cfg.max_attempts,
            successes: std::sync::atomic::AtomicU64::new(0),
            metrics,
            stop,
        })
    }

    pub fn transcoder(&self) -> &Transcoder {
        &self.transcoder
    }

    /// Runs the graph; the answer has the input's form (JSON in, JSON out; protobuf in,
    /// protobuf out with its message name).
    pub async fn infer(&self, input: Msg) -> Result<Msg, CallError> {
        let row_format = self.protocol == Protocol::Tensorflow
            && matches!(&input, Msg::Json(b) if memfind(b, b"\"instances\""));
        let hints = &self.root.hints[usize::from(row_format)];
        let want_json = matches!(input, Msg::Json(_));
        let (out, resp_name) = self.exec(&self.root, input, hints).await?;
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

    fn exec<'a>(
        &'a self,
        node: &'a NodeRt,
        msg: Msg,
        hints: &'a Hints,
    ) -> BoxFuture<'a, Result<(Msg, Option<&'static str>), CallError>> {
        Box::pin(async move {
            match node.cfg.node_type {
                NodeType::Model | NodeType::Transformer => {
                    let (m, name) = self.call(node, msg, hints).await?;
                    match node.children.first() {
                        Some(c) => self.exec(c, m, hints).await,
                        None => Ok((m, name)),
                    }
                }
                NodeType::OutputTransformer => {
                    let m = match node.children.first() {
                        Some(c) => self.exec(c, msg, hints).await?.0,
                        None => msg,
                    };
                    self.call(node, m, hints).await
                }
                NodeType::Router => {
                    let (r, _) = self.call(node, msg.clone(), hints).await?;
                    let branch = self.route_of(&r)?;
                    let child = usize::try_from(branch)
                        .ok()
                        .and_then(|i| node.children.get(i))
                        .ok_or_else(|| CallError::BadRoute {
                            node: node.cfg.name.clone(),
                            branch,
                        })?;
                    self.exec(child, msg, hints).await
                }
                NodeType::Combiner => {
                    let outs = futures::future::try_join_all(
                        node.children
                            .iter()
                            .map(|c| self.exec(c, msg.clone(), hints)),
                    )
                    .await?;
                    let mut list = Vec::new();
                    for (m, _) in outs {
                        list.push(self.as_json_value(m)?);
                    }
                    let body = serde_json::json!({ "seldonMessages": list });
                    let body = Bytes::from(serde_json::to_vec(&body).expect("serializes"));
                    self.call(node, Msg::Json(body), hints).await
                }
            }
        })
    }

    fn as_json_value(&self, m: Msg) -> Result<Value, CallError> {
        let b = match m {
            Msg::Json(b) => b,
            Msg::Proto { name, bytes } => {
                self.transcoder
                    .proto_to_json(self.protocol, &name, &bytes, &Hints::default())?
            }
        };
        serde_json::from_slice(&b)
            .map_err(|e| CallError::Codec(CodecError::MalformedJson(e.to_string())))
    }

    /// A Seldon router answers the branch index as data ([[i]] or a one-value tensor).
    fn route_of(&self, m: &Msg) -> Result<i64, CallError> {
        let v = self.as_json_value(m.clone())?;
        let pick = v
            .pointer("/data/ndarray/0/0")
            .or_else(|| v.pointer("/data/ndarray/0"))
            .or_else(|| v.pointer("/data/tensor/values/0"))
            .and_then(Value::as_f64);
        pick.map(|f| f as i64).ok_or_else(|| {
            CallError::Codec(CodecError::WrongProtocol {
                protocol: Protocol::Seldon,
                why: "router answer carries no branch index".into(),
            })
        })
    }

    /// One node call, in the form its transport needs, with retries of retryable failures.
    async fn call(
        &self,
        node: &NodeRt,
        msg: Msg,
        hints: &Hints,
    ) -> Result<(Msg, Option<&'static str>), CallError> {
        let p = self.protocol;
        let t = node.cfg.node_type;
        let hints = &node.hints[usize::from(hints.tf_row_format)];
        match &node.client {
            Client::Rest(c) => {
                let (json, req) = match msg {
                    Msg::Json(b) => (b, Cow::Borrowed(default_request(p, t))),
                    Msg::Proto { name, bytes } => (
                        self.transcoder.proto_to_json(p, &name, &bytes, hints)?,
                        name,
                    ),
                };
                let other_path;
                let path = if req == default_request(p, t) {
                    node.default_path.as_str()
                } else {
                    other_path =
                        rest_path(p, t, &node.cfg.name, hints.model_version.as_deref(), &req);
                    other_path.as_str()
                };
                let resp_name = grpc_method(p, t, &req).ok().map(|m| m.response);
                let out = self.retrying(|| c.post_json(path, json.clone())).await?;
                Ok((Msg::Json(out), resp_name))
            }
            Client::Grpc(c) => {
                let (bytes, req) = match msg {
                    Msg::Proto { name, bytes } => (bytes, name),
                    Msg::Json(b) => {
                        let req = default_request(p, t);
                        (
                            self.transcoder.json_to_proto(p, req, &b, hints)?,
                            Cow::Borrowed(req),
                        )
                    }
                };
                let method = grpc_method(p, t, &req)?;
                let out = self
                    .retrying(|| c.unary(method.path, bytes.clone()))
                    .await?;
                Ok((
                    Msg::Proto {
                        name: Cow::Borrowed(method.response),
                        bytes: out,
                    },
                    Some(method.response),
                ))
            }
        }
    }

    /// Retries retryable failures with capped exponential backoff until success, a final
    /// error, or shutdown. Poison isolation: failures that may be this request's fault (see
    /// [`ModelError::may_be_the_request`]) count as attempts; after `max_attempts` of them, if
    /// the model answered other calls since this one started, the record gets a final error. Otherwise the
    /// model is down for everyone and the call keeps waiting.
    async fn retrying<F, Fut>(&self, mut f: F) -> Result<Bytes, CallError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<Bytes, ModelError>>,
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
                    if e.may_be_the_request() {
                        attempts += 1;
                        if attempts >= self.max_attempts
                            && self.successes.load(Relaxed) > successes_at_start
                        {
                            return Err(CallError::GaveUp { attempts, last: e });
                        }
                    }
                    self.metrics.record("retry");
                    let wait = backoff.next_wait();
                    tracing::warn!(error = %e, retry_in = ?wait, "model call failed, retrying");
                    if *stop.borrow() {
                        return Err(CallError::Stopped(e));
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = stop.changed() => return Err(CallError::Stopped(e)),
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
}

fn memfind(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}
