//! test-model: a project-owned model server for tests and benchmarks, where no real one can be
//! installed (TensorFlow Serving) or where the model must not be the bottleneck (echo).
//!
//! test-model --protocol tensorflow|v2|seldon --http-port P --grpc-port Q [--name M]
//!            [--fn echo|resnet] [--delay-ms N] [--hang-on TEXT] [--fail-on TEXT[,TEXT]] [--unready]
//!
//! `--fail-on TEXT,...`: a REST request whose body contains one of the texts is refused with
//! 400 (a model that rejects some payloads; the same body is answered by a model started
//! without it).
//! `--hang-on TEXT`: a request (REST, or gRPC predict) whose body contains TEXT never gets an
//! answer (a payload that hangs the model); every other request is answered as usual.
//! `--unready`: the health checks answer 503 (by default 200): REST `GET /v2/health/ready`,
//! `/v2/health/live`, `/v2/models/<M>/ready` (v2), `GET /v1/models/<M>` (tensorflow),
//! `GET /health/ping` (seldon); gRPC `ServerReady` (v2).
//!
//! - tensorflow: REST `/v1/models/<M>[/versions/<v>]:predict` and gRPC
//!   `tensorflow.serving.PredictionService/Predict`. `--fn resnet` (a cifar10 stand-in) answers
//!   output `scores` [batch, 10] with scores[b][k] = mean(row b) + k; `--fn echo` returns the
//!   inputs as outputs.
//! - v2: REST `/v2/models/<M>/infer` and gRPC `ModelInfer`: inputs echoed as outputs.
//! - seldon: REST (any path: the message echoed with the path in `meta.tags.path`) and every
//!   gRPC method (the message echoed).
//!
//! Listens on 127.0.0.1 only.

use std::{convert::Infallible, net::SocketAddr, sync::Arc};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use codec::{Hints, Protocol, Transcoder};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use serde_json::{Value, json};

#[derive(Clone)]
struct Model {
    protocol: Protocol,
    name: String,
    resnet: bool,
    /// Answer after this long (to keep requests in flight).
    delay: std::time::Duration,
    /// A REST body containing this never gets an answer.
    hang_on: Option<String>,
    /// A REST body containing one of these gets 400.
    fail_on: Vec<String>,
    /// Health checks answer 503.
    unready: bool,
    transcoder: Arc<Transcoder>,
}

type Body = BoxBody<Bytes, Infallible>;

fn full(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(body.into()).boxed())
        .expect("response")
}

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let protocol: Protocol = arg(&args, "--protocol")
        .unwrap_or_else(|| "v2".into())
        .parse()
        .map_err(|e: String| anyhow::anyhow!(e))?;
    let model = Model {
        protocol,
        name: arg(&args, "--name").unwrap_or_else(|| "model".into()),
        resnet: arg(&args, "--fn").as_deref() == Some("resnet"),
        delay: std::time::Duration::from_millis(
            arg(&args, "--delay-ms")
                .unwrap_or_else(|| "0".into())
                .parse()?,
        ),
        hang_on: arg(&args, "--hang-on"),
        fail_on: arg(&args, "--fail-on")
            .map(|l| {
                l.split(',')
                    .filter(|t| !t.is_empty())
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default(),
        unready: args.iter().any(|a| a == "--unready"),
        transcoder: Arc::new(Transcoder::default()),
    };
    let http: u16 = arg(&args, "--http-port")
        .unwrap_or_else(|| "0".into())
        .parse()?;
    let grpc: u16 = arg(&args, "--grpc-port")
        .unwrap_or_else(|| "0".into())
        .parse()?;
    let a = serve(
        SocketAddr::from(([127, 0, 0, 1], http)),
        model.clone(),
        false,
    );
    let b = serve(SocketAddr::from(([127, 0, 0, 1], grpc)), model, true);
    tokio::try_join!(a, b)?;
    Ok(())
}

async fn serve(addr: SocketAddr, model: Model, grpc: bool) -> anyhow::Result<()> {
    let l = tokio::net::TcpListener::bind(addr).await?;
    loop {
        let (s, _) = l.accept().await?;
        s.set_nodelay(true).ok();
        let m = model.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let m = m.clone();
                async move {
                    if !m.delay.is_zero() {
                        tokio::time::sleep(m.delay).await;
                    }
                    Ok::<_, Infallible>(if grpc {
                        m.grpc(req).await
                    } else {
                        m.rest(req).await
                    })
                }
            });
            let io = hyper_util::rt::TokioIo::new(s);
            if grpc {
                let _ =
                    hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .serve_connection(io, svc)
                        .await;
            } else {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(io, svc)
                    .await;
            }
        });
    }
}

impl Model {
    async fn rest(&self, req: Request<Incoming>) -> Response<Body> {
        let path = req.uri().path().to_owned();
        if req.method() == http::Method::GET {
            return self.health(&path);
        }
        let Ok(body) = req.into_body().collect().await.map(|b| b.to_bytes()) else {
            return full(StatusCode::BAD_REQUEST, "{\"error\":\"body\"}");
        };
        if let Some(h) = &self.hang_on
            && body.windows(h.len()).any(|w| w == h.as_bytes())
        {
            // Bounded: an hour is past every timeout a test sets.
            tokio::time::sleep(std::time::Duration::from_secs(3600)).await;
        }
        if let Some(t) = self
            .fail_on
            .iter()
            .find(|t| body.windows(t.len()).any(|w| w == t.as_bytes()))
        {
            return full(
                StatusCode::BAD_REQUEST,
                json!({"error": format!("refused: the request contains `{t}`")}).to_string(),
            );
        }
        match self.protocol {
            // The message echoed, with the path it came to in meta.tags.path.
            Protocol::Seldon => match serde_json::from_slice::<Value>(&body) {
                Ok(Value::Object(mut m)) => {
                    let meta = m.entry("meta").or_insert_with(|| json!({}));
                    meta["tags"]["path"] = json!(path);
                    full(StatusCode::OK, Value::Object(m).to_string())
                }
                _ => full(StatusCode::BAD_REQUEST, json!({"status": {"code": 400, "info": "not a JSON object", "status": "FAILURE"}}).to_string()),
            },
            Protocol::V2 => {
                if path != format!("/v2/models/{}/infer", self.name)
                    && !path.starts_with(&format!("/v2/models/{}/versions/", self.name))
                {
                    return full(
                        StatusCode::NOT_FOUND,
                        json!({"error": format!("Model {path} not found")}).to_string(),
                    );
                }
                match serde_json::from_slice::<Value>(&body) {
                    Ok(v) => {
                        let mut out = json!({"model_name": self.name, "outputs": v.get("inputs").cloned().unwrap_or(json!([]))});
                        if let Some(id) = v.get("id") {
                            out["id"] = id.clone();
                        }
                        full(StatusCode::OK, out.to_string())
                    }
                    Err(e) => full(
                        StatusCode::BAD_REQUEST,
                        json!({"error": e.to_string()}).to_string(),
                    ),
                }
            }
            Protocol::Tensorflow => {
                let prefix = format!("/v1/models/{}", self.name);
                if !path.starts_with(&prefix) || !path.ends_with(":predict") {
                    return full(
                        StatusCode::NOT_FOUND,
                        json!({"error": format!("Servable not found for request: {path}")})
                            .to_string(),
                    );
                }
                match serde_json::from_slice::<Value>(&body)
                    .map_err(|e| e.to_string())
                    .and_then(|v| self.tf_predict(&v))
                {
                    Ok(out) => full(StatusCode::OK, out.to_string()),
                    Err(e) => full(StatusCode::BAD_REQUEST, json!({"error": e}).to_string()),
                }
            }
        }
    }

    /// The protocol's REST health check, answered at once (also while a request hangs).
    fn health(&self, path: &str) -> Response<Body> {
        let known = match self.protocol {
            Protocol::V2 => {
                path == "/v2/health/ready"
                    || path == "/v2/health/live"
                    || path == format!("/v2/models/{}/ready", self.name)
            }
            Protocol::Tensorflow => path == format!("/v1/models/{}", self.name),
            Protocol::Seldon => path == "/health/ping",
        };
        if !known {
            return full(StatusCode::NOT_FOUND, "{\"error\":\"not found\"}");
        }
        if self.unready {
            return full(StatusCode::SERVICE_UNAVAILABLE, "{\"error\":\"unready\"}");
        }
        match self.protocol {
            Protocol::Tensorflow => full(
                StatusCode::OK,
                json!({"model_version_status": [{"version": "1", "state": "AVAILABLE",
                    "status": {"error_code": "OK", "error_message": ""}}]})
                .to_string(),
            ),
            Protocol::Seldon => full(StatusCode::OK, "pong"),
            Protocol::V2 => full(StatusCode::OK, "{}"),
        }
    }

    /// TF REST semantics: row format in -> `predictions`, columnar in -> `outputs`.
    fn tf_predict(&self, v: &Value) -> Result<Value, String> {
        let (rows, row_format) = match (v.get("instances"), v.get("inputs")) {
            (Some(i), None) => (i.clone(), true),
            (None, Some(Value::Object(m))) if m.len() == 1 => {
                (m.values().next().cloned().unwrap_or_default(), false)
            }
            (None, Some(Value::Object(m))) => (
                m.get("input_1")
                    .cloned()
                    .ok_or("several inputs; expected input_1")?,
                false,
            ),
            (None, Some(x)) => (x.clone(), false),
            _ => return Err("expected instances or inputs".into()),
        };
        let out = if self.resnet {
            let rows = rows.as_array().ok_or("batch is not a list")?;
            Value::Array(
                rows.iter()
                    .map(|r| {
                        let (_, leaves) = codec::tensor::flatten(r).map_err(|e| e.to_string())?;
                        let n = leaves.len().max(1) as f64;
                        let mean: f64 = leaves.iter().filter_map(|x| x.as_f64()).sum::<f64>() / n;
                        let mean = (mean * 1e4).round() / 1e4;
                        Ok(Value::Array(
                            (0..10).map(|k| json!(mean + k as f64)).collect(),
                        ))
                    })
                    .collect::<Result<_, String>>()?,
            )
        } else {
            rows
        };
        Ok(if row_format {
            json!({ "predictions": out })
        } else {
            json!({ "outputs": out })
        })
    }

    async fn grpc(&self, req: Request<Incoming>) -> Response<Body> {
        let path = req.uri().path().to_owned();
        let Ok(mut body) = req.into_body().collect().await.map(|b| b.to_bytes()) else {
            return grpc_reply(Err((13, "body".into())));
        };
        if body.len() < 5 {
            return grpc_reply(Err((3, "short frame".into())));
        }
        body.advance(5);
        if let Some(h) = &self.hang_on
            && body.windows(h.len()).any(|w| w == h.as_bytes())
        {
            // Bounded: an hour is past every timeout a test sets.
            tokio::time::sleep(std::time::Duration::from_secs(3600)).await;
        }
        let r = match (self.protocol, path.as_str()) {
            (Protocol::Seldon, _) => Ok(body),
            (Protocol::V2, "/inference.GRPCInferenceService/ModelInfer") => Ok(v2_echo(&body)),
            // ServerReadyResponse { ready }
            (Protocol::V2, "/inference.GRPCInferenceService/ServerReady") => {
                Ok(Bytes::from_static(if self.unready {
                    &[]
                } else {
                    &[0x08, 0x01]
                }))
            }
            (Protocol::Tensorflow, "/tensorflow.serving.PredictionService/Predict") => {
                self.tf_grpc(&body)
            }
            _ => Err((12, format!("unknown method {path}"))),
        };
        grpc_reply(r)
    }

    fn tf_grpc(&self, body: &[u8]) -> Result<Bytes, (i32, String)> {
        let t = &self.transcoder;
        let name = "tensorflow.serving.PredictRequest";
        let spec = t
            .to_proto_json(name, body, false)
            .map_err(|e| (3, e.to_string()))?;
        let model = spec
            .pointer("/model_spec/name")
            .and_then(Value::as_str)
            .unwrap_or_default();
        if model != self.name {
            return Err((
                5,
                format!("Servable not found for request: Latest({model})"),
            ));
        }
        let rest = t
            .proto_to_json(Protocol::Tensorflow, name, body, &Hints::default())
            .map_err(|e| (3, e.to_string()))?;
        let v: Value = serde_json::from_slice(&rest).map_err(|e| (3, e.to_string()))?;
        let out = self.tf_predict(&v).map_err(|e| (3, e))?;
        let named = json!({"outputs": {"scores": out["outputs"].clone()}});
        t.json_to_proto(
            Protocol::Tensorflow,
            "tensorflow.serving.PredictResponse",
            named.to_string().as_bytes(),
            &Hints::default(),
        )
        .map_err(|e| (13, e.to_string()))
    }
}

/// ModelInferRequest -> ModelInferResponse at the wire level: fields 1-5 keep their numbers
/// (InferOutputTensor has InferInputTensor's layout), requested outputs (6) go, raw input
/// contents (7) become raw output contents (6).
fn v2_echo(mut b: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(b.len());
    while !b.is_empty() {
        let start = b;
        let Some(tag) = varint(&mut b) else { break };
        let (field, wire) = (tag >> 3, tag & 7);
        let skip = match wire {
            0 => varint(&mut b).map(|_| 0),
            1 => Some(8),
            2 => varint(&mut b).map(|n| n as usize),
            5 => Some(4),
            _ => None,
        };
        let Some(skip) = skip.filter(|s| *s <= b.len()) else {
            break;
        };
        b = &b[skip..];
        let whole = &start[..start.len() - b.len()];
        match field {
            1..=5 => out.put_slice(whole),
            // Tag 7/LEN is one byte (0x3a); 6/LEN is 0x32.
            7 => {
                out.put_u8(0x32);
                out.put_slice(&whole[1..]);
            }
            _ => {}
        }
    }
    out.freeze()
}

fn varint(b: &mut &[u8]) -> Option<u64> {
    let mut v = 0u64;
    for i in 0..10 {
        let (&x, rest) = b.split_first()?;
        *b = rest;
        v |= u64::from(x & 0x7f) << (7 * i);
        if x & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

fn grpc_reply(r: Result<Bytes, (i32, String)>) -> Response<Body> {
    let mut trailers = http::HeaderMap::new();
    let mut frames: Vec<Result<Frame<Bytes>, Infallible>> = Vec::new();
    match r {
        Ok(msg) => {
            let mut f = BytesMut::with_capacity(msg.len() + 5);
            f.put_u8(0);
            f.put_u32(msg.len() as u32);
            f.put_slice(&msg);
            frames.push(Ok(Frame::data(f.freeze())));
            trailers.insert("grpc-status", "0".parse().expect("header"));
        }
        Err((code, message)) => {
            trailers.insert("grpc-status", code.to_string().parse().expect("header"));
            let m: String = message
                .chars()
                .filter(|c| c.is_ascii_graphic() || *c == ' ')
                .collect();
            trailers.insert(
                "grpc-message",
                m.parse()
                    .unwrap_or_else(|_| "error".parse().expect("header")),
            );
        }
    }
    frames.push(Ok(Frame::trailers(trailers)));
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/grpc")
        .body(StreamBody::new(futures::stream::iter(frames)).boxed())
        .expect("response")
}
