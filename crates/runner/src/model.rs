//! Model clients: REST (hyper 1, pooled keep-alive, HTTP/1.1) and gRPC (tonic over a hyper
//! HTTP/2 client, with a pass-through bytes codec so requests are forwarded undecoded).
//! Every call has a timeout; every failure is classified retryable or final.

use std::time::Duration;

use bytes::{Buf, BufMut, Bytes};
use http::{HeaderMap, Request, Uri, header};
use http_body_util::{BodyExt, Full};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};

/// How many characters of a model's error body (or gRPC message) are kept, escaped
/// ([`codec::text::printable`]): it goes into logs and error records.
pub const MAX_MODEL_TEXT: usize = 1024;

/// Why a model call failed, and whether trying again may help.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ModelError {
    #[error("model unreachable at {url}: {why}")]
    Unreachable { url: String, why: String },
    #[error("model call to {url} timed out after {after:?}")]
    Timeout { url: String, after: Duration },
    #[error("model at {url} answered HTTP {status}: {body}")]
    Http {
        url: String,
        status: u16,
        body: String,
    },
    #[error("model at {url} answered gRPC {code}: {message}")]
    Grpc {
        url: String,
        code: String,
        message: String,
        retryable: bool,
    },
}

impl ModelError {
    /// Connection refused/reset, timeouts, HTTP 408/429/502/503/504, gRPC UNAVAILABLE,
    /// RESOURCE_EXHAUSTED, DEADLINE_EXCEEDED, ABORTED: worth retrying. Anything else the model
    /// said about this request is final.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Unreachable { .. } | Self::Timeout { .. } => true,
            Self::Http { status, .. } => matches!(status, 408 | 429 | 502 | 503 | 504),
            Self::Grpc { retryable, .. } => *retryable,
        }
    }

    /// A retryable failure that may be this request's fault (a payload that hangs or crashes
    /// the model): a timeout, a connection lost mid-call, a gateway error. Refused connections,
    /// 429 and 503 say the model is down or busy for everyone.
    pub fn may_be_the_request(&self) -> bool {
        match self {
            Self::Timeout { .. } => true,
            Self::Unreachable { why, .. } => {
                let w = why.to_ascii_lowercase();
                !(w.contains("refused")
                    || w.contains("connect error")
                    || w.contains("tcp connect")
                    || w.contains("dns")
                    || w.contains("resolve"))
            }
            Self::Http { status, .. } => matches!(status, 502 | 504),
            Self::Grpc {
                code, retryable, ..
            } => {
                // Codes are stored upper-cased (`UNAVAILABLE`, `RESOURCEEXHAUSTED`).
                *retryable
                    && !code.eq_ignore_ascii_case("Unavailable")
                    && !code.eq_ignore_ascii_case("ResourceExhausted")
            }
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Self::Unreachable { .. } => "model-unreachable",
            Self::Timeout { .. } => "model-timeout",
            Self::Http { .. } => "model-rejected",
            Self::Grpc { .. } => "model-rejected",
        }
    }

    /// An HTTP-like status for protocol-shaped error bodies.
    pub fn status(&self) -> u16 {
        match self {
            Self::Http { status, .. } => *status,
            Self::Timeout { .. } => 504,
            Self::Unreachable { .. } => 503,
            Self::Grpc { .. } => 500,
        }
    }
}

/// A model's answer: its body and its response headers (gRPC: response metadata).
#[derive(Debug)]
pub struct Reply {
    pub body: Bytes,
    pub headers: HeaderMap,
}

type HttpClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

pub(crate) fn https_connector(
    tls: Option<std::sync::Arc<rustls::ClientConfig>>,
    h2: bool,
) -> hyper_rustls::HttpsConnector<HttpConnector> {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(Duration::from_secs(5)));
    let cfg = tls.map(|c| (*c).clone()).unwrap_or_else(|| {
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots());
        rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("ring supports the default versions")
        .with_root_certificates(roots)
        .with_no_client_auth()
    });
    let b = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(cfg)
        .https_or_http();
    if h2 {
        b.enable_http2().wrap_connector(http)
    } else {
        b.enable_http1().wrap_connector(http)
    }
}

fn webpki_roots() -> impl Iterator<Item = rustls::pki_types::TrustAnchor<'static>> {
    webpki_roots::TLS_SERVER_ROOTS.iter().cloned()
}

/// A REST model endpoint (scheme://host:port).
#[derive(Clone)]
pub struct RestClient {
    client: HttpClient,
    base: String,
    /// `base` without its userinfo, for errors (they are logged and put in error records).
    shown: String,
    timeout: Duration,
}

impl RestClient {
    pub fn new(
        base: &str,
        timeout: Duration,
        tls: Option<std::sync::Arc<rustls::ClientConfig>>,
    ) -> Self {
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(1024)
            .build(https_connector(tls, false));
        let base = base.trim_end_matches('/').to_owned();
        Self {
            client,
            shown: crate::config::without_userinfo(&base).into_owned(),
            base,
            timeout,
        }
    }

    /// POSTs a JSON body to `path` with `headers`; a 2xx body comes back with the
    /// response's headers.
    pub async fn post_json(
        &self,
        path: &str,
        body: Bytes,
        headers: &HeaderMap,
    ) -> Result<Reply, ModelError> {
        self.post(path, body, "application/json", headers).await
    }

    /// GETs `path` (a health endpoint): Ok for a 2xx answer within the timeout.
    pub async fn get(&self, path: &str) -> Result<(), ModelError> {
        let url = format!("{}{}", self.base, path);
        let req = Request::get(url.as_str())
            .body(Full::new(Bytes::new()))
            .map_err(|e| ModelError::Unreachable {
                url: url.clone(),
                why: e.to_string(),
            })?;
        let call = async {
            let resp = self
                .client
                .request(req)
                .await
                .map_err(|e| ModelError::Unreachable {
                    url: url.clone(),
                    why: error_chain(&e),
                })?;
            let status = resp.status();
            // Read to the end, so the connection goes back to the pool.
            let _ = resp.into_body().collect().await;
            if status.is_success() {
                Ok(())
            } else {
                Err(ModelError::Http {
                    url: url.clone(),
                    status: status.as_u16(),
                    body: String::new(),
                })
            }
        };
        tokio::time::timeout(self.timeout, call)
            .await
            .unwrap_or_else(|_| {
                Err(ModelError::Timeout {
                    url: url.clone(),
                    after: self.timeout,
                })
            })
    }

    /// POSTs `body` of `content_type` to `path` with `headers`.
    pub async fn post(
        &self,
        path: &str,
        body: Bytes,
        content_type: &'static str,
        headers: &HeaderMap,
    ) -> Result<Reply, ModelError> {
        let url = format!("{}{}", self.base, path);
        let shown = || format!("{}{}", self.shown, path);
        let mut req = Request::post(url.as_str())
            .header(header::CONTENT_TYPE, content_type)
            .header(header::ACCEPT, "application/json")
            .body(Full::new(body))
            .map_err(|e| ModelError::Unreachable {
                url: shown(),
                why: e.to_string(),
            })?;
        for (k, v) in headers {
            req.headers_mut().append(k, v.clone());
        }
        let call = async {
            let resp = self
                .client
                .request(req)
                .await
                .map_err(|e| ModelError::Unreachable {
                    url: shown(),
                    why: error_chain(&e),
                })?;
            let status = resp.status();
            let (parts, body) = resp.into_parts();
            let body = body
                .collect()
                .await
                .map_err(|e| ModelError::Unreachable {
                    url: shown(),
                    why: format!("reading the response: {e}"),
                })?
                .to_bytes();
            if status.is_success() {
                Ok(Reply {
                    body,
                    headers: parts.headers,
                })
            } else {
                Err(ModelError::Http {
                    url: shown(),
                    status: status.as_u16(),
                    body: codec::text::printable(&String::from_utf8_lossy(&body), MAX_MODEL_TEXT),
                })
            }
        };
        tokio::time::timeout(self.timeout, call)
            .await
            .unwrap_or_else(|_| {
                Err(ModelError::Timeout {
                    url: shown(),
                    after: self.timeout,
                })
            })
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(x) = src {
        s.push_str(": ");
        s.push_str(&x.to_string());
        src = x.source();
    }
    s
}

/// Passes protobuf bytes through tonic without decoding them.
#[derive(Clone, Copy, Default)]
pub struct BytesCodec;

impl Codec for BytesCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = BytesCodec;
    type Decoder = BytesCodec;
    fn encoder(&mut self) -> Self::Encoder {
        *self
    }
    fn decoder(&mut self) -> Self::Decoder {
        *self
    }
}

impl Encoder for BytesCodec {
    type Item = Bytes;
    type Error = tonic::Status;
    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for BytesCodec {
    type Item = Bytes;
    type Error = tonic::Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, tonic::Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

type GrpcHttp = Client<hyper_rustls::HttpsConnector<HttpConnector>, tonic::body::Body>;

/// A gRPC model endpoint (http://host:port for h2c, https:// for TLS).
#[derive(Clone)]
pub struct GrpcClient {
    inner: tonic::client::Grpc<GrpcHttp>,
    /// The base URL without its userinfo (errors only: the origin is in `inner`).
    shown: String,
    timeout: Duration,
}

impl GrpcClient {
    pub fn new(
        base: &str,
        timeout: Duration,
        tls: Option<std::sync::Arc<rustls::ClientConfig>>,
    ) -> anyhow::Result<Self> {
        let client: GrpcHttp = Client::builder(TokioExecutor::new())
            .http2_only(true)
            .pool_idle_timeout(Duration::from_secs(60))
            .build(https_connector(tls, true));
        let origin: Uri = base.parse()?;
        Ok(Self {
            inner: tonic::client::Grpc::with_origin(client, origin)
                .max_decoding_message_size(256 * 1024 * 1024),
            shown: crate::config::without_userinfo(base.trim_end_matches('/')).into_owned(),
            timeout,
        })
    }

    /// Unary call of `path` (e.g. /inference.GRPCInferenceService/ModelInfer) with raw bytes,
    /// `headers` as request metadata; the answer comes with its response metadata.
    pub async fn unary(
        &self,
        path: &'static str,
        body: Bytes,
        headers: &HeaderMap,
    ) -> Result<Reply, ModelError> {
        let url = format!("{}{}", self.shown, path);
        let mut grpc = self.inner.clone();
        let call = async {
            grpc.ready().await.map_err(|e| ModelError::Unreachable {
                url: url.clone(),
                why: error_chain(&e),
            })?;
            let mut req = tonic::Request::from_parts(
                tonic::metadata::MetadataMap::from_headers(headers.clone()),
                Default::default(),
                body,
            );
            req.set_timeout(self.timeout);
            grpc.unary(req, http::uri::PathAndQuery::from_static(path), BytesCodec)
                .await
                .map(|r| {
                    let (meta, body, _) = r.into_parts();
                    Reply {
                        body,
                        headers: meta.into_headers(),
                    }
                })
                .map_err(|s| classify_status(&url, &s))
        };
        tokio::time::timeout(self.timeout + Duration::from_millis(200), call)
            .await
            .unwrap_or_else(|_| {
                Err(ModelError::Timeout {
                    url: url.clone(),
                    after: self.timeout,
                })
            })
    }
}

fn classify_status(url: &str, s: &tonic::Status) -> ModelError {
    use tonic::Code as C;
    // tonic reports connection failures as UNAVAILABLE/UNKNOWN with a transport source.
    let transport = s.code() == C::Unknown && std::error::Error::source(s).is_some();
    if transport || (s.code() == C::Unavailable && s.message().contains("connect")) {
        return ModelError::Unreachable {
            url: url.to_owned(),
            why: error_chain(s),
        };
    }
    ModelError::Grpc {
        url: url.to_owned(),
        code: format!("{:?}", s.code()).to_uppercase(),
        message: codec::text::printable(s.message(), MAX_MODEL_TEXT),
        retryable: matches!(
            s.code(),
            C::Unavailable | C::ResourceExhausted | C::DeadlineExceeded | C::Aborted
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Model errors are logged and put in error records: a URL's userinfo never shows there.
    #[tokio::test]
    async fn errors_name_the_url_without_its_userinfo() {
        let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = free.local_addr().unwrap().port();
        drop(free); // nothing listens there now: refused
        let base = format!("http://alice:pw-in-url@127.0.0.1:{port}");
        let rest = RestClient::new(&base, Duration::from_secs(5), None);
        let e = rest
            .post_json("/predict", Bytes::from_static(b"{}"), &HeaderMap::new())
            .await
            .unwrap_err()
            .to_string();
        assert!(
            !e.contains("pw-in-url") && e.contains(&format!("http://***@127.0.0.1:{port}/predict")),
            "{e}"
        );
        let grpc = GrpcClient::new(&base, Duration::from_secs(5), None).unwrap();
        let e = grpc
            .unary("/a.B/C", Bytes::new(), &HeaderMap::new())
            .await
            .unwrap_err()
            .to_string();
        assert!(
            !e.contains("pw-in-url") && e.contains(&format!("http://***@127.0.0.1:{port}/a.B/C")),
            "{e}"
        );
    }
}
