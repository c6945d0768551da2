//! One connection to one broker for the requests rskafka lacks (group coordination, offsets):
//! size-prefixed framing, correlation ids, ApiVersions and version choice, TLS, SASL. Requests go
//! one at a time, or pipelined (the producer: several written before their responses are read,
//! which Kafka gives in request order; a correlation id out of order is a protocol error that
//! drops the connection); every call has a timeout. When the broker gives the SASL session a
//! lifetime (KIP-368), the connection re-authenticates before a request once 85-95% of it has
//! passed: only when no request is outstanding, so nothing in flight is lost or sent twice.

use std::{
    collections::{HashMap, VecDeque},
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use kafka_protocol::{
    messages::{
        ApiVersionsRequest, FetchRequest, FetchResponse, FindCoordinatorRequest, RequestHeader,
        ResponseHeader, SaslAuthenticateRequest, SaslHandshakeRequest,
    },
    protocol::{Decodable, Encodable, HeaderVersion, Request, StrBytes},
};
use rustls::pki_types::ServerName;
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::TcpStream,
};

use crate::{
    error::{Error, Result},
    settings::{BrokerAddr, ConnectionSettings},
};

trait Stream: AsyncRead + AsyncWrite + Unpin + Send + Sync {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + Sync> Stream for T {}

/// A protocol string from `v` (kafka-protocol's `StrBytes`).
pub(crate) fn s(v: &str) -> StrBytes {
    StrBytes::from_string(v.to_owned())
}

/// Largest response frame accepted (guards against garbage length prefixes).
const MAX_FRAME: usize = 64 * 1024 * 1024;

/// How to open connections: the settings plus the TLS config built once from them.
#[derive(Clone)]
pub struct Connector {
    pub settings: Arc<ConnectionSettings>,
    tls: Option<Arc<rustls::ClientConfig>>,
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
}

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connector")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl Connector {
    pub fn new(settings: Arc<ConnectionSettings>) -> Result<Self> {
        let tls = match &settings.built_tls {
            _ if !settings.security.uses_tls() => None,
            Some(built) => Some(built.0.clone()),
            None => Some(crate::tls::client_config(&settings.tls)?),
        };
        Ok(Self {
            settings,
            tls,
            connect_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
        })
    }

    pub fn tls_config(&self) -> Option<Arc<rustls::ClientConfig>> {
        self.tls.clone()
    }

    /// Connects to the first bootstrap broker that answers.
    pub async fn connect_any(&self) -> Result<BrokerConn> {
        let mut last = None;
        for addr in &self.settings.bootstrap {
            match self.connect(addr).await {
                Ok(c) => return Ok(c),
                Err(e) => {
                    tracing::debug!(broker = %addr, error = %e, "bootstrap broker unreachable");
                    // A certificate problem says more than another broker being down.
                    if !last.as_ref().is_some_and(Error::is_certificate_problem) {
                        last = Some(e)
                    }
                }
            }
        }
        Err(last.unwrap_or(Error::Closed))
    }

    /// FindCoordinator for `key` (`key_type` 0: a group, 1: a transactional id) through any
    /// bootstrap broker, and a connection to the coordinator (that one, when it is the
    /// coordinator).
    pub async fn find_coordinator(&self, key_type: i8, key: &str) -> Result<BrokerConn> {
        const MAX: i16 = 3;
        let mut any = self.connect_any().await?;
        let v = any.version::<FindCoordinatorRequest>("FindCoordinator", MAX)?;
        if key_type != 0 && v < 1 {
            return Err(Error::Version {
                call: "FindCoordinator (transaction)",
                ours: format!("1..{MAX}"),
                theirs: "0".into(),
            });
        }
        let resp = any
            .send(
                FindCoordinatorRequest::default()
                    .with_key(s(key))
                    .with_key_type(key_type),
                v,
                "FindCoordinator",
            )
            .await?;
        if resp.error_code != 0 {
            return Err(broker_error(
                "FindCoordinator",
                resp.error_code,
                resp.error_message.as_ref(),
            ));
        }
        let addr = BrokerAddr {
            host: resp.host.to_string(),
            port: u16::try_from(resp.port).map_err(|_| Error::Protocol {
                call: "FindCoordinator",
                why: format!("bad port {}", resp.port),
            })?,
        };
        tracing::debug!(key, key_type, coordinator = %addr, "found coordinator");
        if addr.to_string() == any.broker() {
            Ok(any)
        } else {
            self.connect(&addr).await
        }
    }

    /// Opens, secures and authenticates one connection, and learns the broker's API versions.
    pub async fn connect(&self, addr: &BrokerAddr) -> Result<BrokerConn> {
        self.connect_steps(addr).await.map_err(|(_, e)| e)
    }

    /// [`connect`](Self::connect), saying which step failed (for `kafka-infer check`).
    pub async fn connect_steps(
        &self,
        addr: &BrokerAddr,
    ) -> std::result::Result<BrokerConn, (ConnectStep, Error)> {
        let name = addr.to_string();
        let tcp = tokio::time::timeout(
            self.connect_timeout,
            TcpStream::connect((addr.host.as_str(), addr.port)),
        )
        .await
        .map_err(|_| Error::Timeout {
            call: "connect",
            broker: name.clone(),
            after: self.connect_timeout,
        })
        .and_then(|r| {
            r.map_err(|e| Error::Connect {
                broker: name.clone(),
                why: e.to_string(),
            })
        })
        .map_err(|e| (ConnectStep::Tcp, e))?;
        tcp.set_nodelay(true).ok();
        let stream: Box<dyn Stream> = match &self.tls {
            None => Box::new(tcp),
            Some(cfg) => {
                let tls_step = async {
                    let server =
                        ServerName::try_from(addr.host.clone()).map_err(|e| Error::Connect {
                            broker: name.clone(),
                            why: format!("invalid TLS server name: {e}"),
                        })?;
                    let tls = tokio_rustls::TlsConnector::from(cfg.clone());
                    tokio::time::timeout(self.connect_timeout, tls.connect(server, tcp))
                        .await
                        .map_err(|_| Error::Timeout {
                            call: "TLS handshake",
                            broker: name.clone(),
                            after: self.connect_timeout,
                        })?
                        .map_err(|e| handshake_error(&name, e))
                };
                Box::new(tls_step.await.map_err(|e| (ConnectStep::Tls, e))?)
            }
        };
        let mut conn = BrokerConn {
            stream,
            broker: name,
            correlation: 0,
            versions: HashMap::new(),
            client_id: StrBytes::from_string(self.settings.client_id.clone()),
            timeout: self.request_timeout,
            settings: self.settings.clone(),
            session_lifetime: None,
            reauth_at: None,
            reauthentications: 0,
            in_flight: VecDeque::new(),
            rbuf: BytesMut::new(),
            broken: false,
        };
        conn.api_versions().await.map_err(|e| {
            // Under TLS 1.3 a refused client certificate shows on the first read.
            let step = if e.is_certificate_problem() {
                ConnectStep::Tls
            } else {
                ConnectStep::ApiVersions
            };
            (step, e)
        })?;
        if let Some(sasl) = &self.settings.sasl {
            crate::sasl::authenticate(&mut conn, sasl)
                .await
                .map_err(|e| (ConnectStep::Sasl, e))?;
            conn.schedule_reauth();
        }
        Ok(conn)
    }
}

/// The steps of opening a connection, in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnectStep {
    /// The TCP connection.
    Tcp,
    /// The TLS handshake (SSL, SASL_SSL).
    Tls,
    /// The first Kafka request (ApiVersions): fails when the broker speaks TLS and we do not.
    ApiVersions,
    /// SASL authentication (SASL_PLAINTEXT, SASL_SSL).
    Sasl,
}

impl ConnectStep {
    pub fn name(self) -> &'static str {
        match self {
            Self::Tcp => "TCP",
            Self::Tls => "TLS",
            Self::ApiVersions => "ApiVersions",
            Self::Sasl => "SASL",
        }
    }
}

/// An open connection. Not shared: the owning task sends one request at a time
/// ([`send`](Self::send)), or pipelines several ([`send_pipelined`](Self::send_pipelined), then
/// [`recv`](Self::recv) in order).
pub struct BrokerConn {
    stream: Box<dyn Stream>,
    broker: String,
    correlation: i32,
    versions: HashMap<i16, (i16, i16)>,
    client_id: StrBytes,
    timeout: Duration,
    settings: Arc<ConnectionSettings>,
    /// The SASL session lifetime the broker gave at the last authentication (KIP-368).
    session_lifetime: Option<Duration>,
    /// When to re-authenticate, before the next request from then on.
    reauth_at: Option<Instant>,
    reauthentications: u64,
    /// Requests written and not yet answered, oldest first (pipelining).
    in_flight: VecDeque<Outstanding>,
    /// Bytes read and not yet taken as a response frame.
    rbuf: BytesMut,
    /// A request or response failed part-way: nothing more can be sent or read.
    broken: bool,
}

/// A request whose response has not been read.
#[derive(Clone, Copy)]
struct Outstanding {
    correlation: i32,
    api_key: i16,
    version: i16,
    call: &'static str,
}

impl BrokerConn {
    /// How many times this connection re-authenticated (KIP-368).
    pub fn reauthentications(&self) -> u64 {
        self.reauthentications
    }

    /// Sets the re-authentication time at 85-95% of the session lifetime (as the Java client),
    /// or none when the broker gave no lifetime.
    fn schedule_reauth(&mut self) {
        self.reauth_at = self
            .session_lifetime
            .map(|l| Instant::now() + l.mul_f64(0.85 + rand::random::<f64>() * 0.10));
    }

    /// Re-authenticates when the session is near its end (KIP-368). A failure is an I/O-type
    /// error: the caller drops the connection and reconnects, whose authentication says why.
    async fn reauthenticate_if_due(&mut self) -> Result<()> {
        if self.reauth_at.is_none_or(|t| Instant::now() < t) {
            return Ok(());
        }
        self.reauth_at = None;
        let settings = self.settings.clone();
        let Some(sasl) = &settings.sasl else {
            return Ok(());
        };
        self.session_lifetime = None;
        match crate::sasl::authenticate(self, sasl).await {
            Ok(()) => {
                self.reauthentications += 1;
                tracing::debug!(broker = %self.broker, lifetime = ?self.session_lifetime,
                    "SASL session re-authenticated");
                self.schedule_reauth();
                Ok(())
            }
            Err(e) => Err(Error::Io {
                call: "SASL re-authentication",
                broker: self.broker.clone(),
                why: format!("refused, so the connection is opened again ({e})"),
            }),
        }
    }
    pub fn broker(&self) -> &str {
        &self.broker
    }

    /// The highest version of `R` both sides speak, capped at `cap`.
    pub fn version<R: Request>(&self, call: &'static str, cap: i16) -> Result<i16> {
        let ours = R::VERSIONS;
        let (min, max) = self
            .versions
            .get(&R::KEY)
            .copied()
            .ok_or_else(|| Error::Version {
                call,
                ours: format!("{}..{}", ours.min, ours.max),
                theirs: "none".into(),
            })?;
        let hi = max.min(ours.max).min(cap);
        let lo = min.max(ours.min);
        if hi < lo {
            return Err(Error::Version {
                call,
                ours: format!("{}..{}", ours.min, ours.max.min(cap)),
                theirs: format!("{min}..{max}"),
            });
        }
        Ok(hi)
    }

    async fn api_versions(&mut self) -> Result<()> {
        // v0 is understood by every broker; v3 adds client software name (tagged header).
        let req = ApiVersionsRequest::default();
        let resp = self.send(req, 0, "ApiVersions").await?;
        if resp.error_code != 0 {
            return Err(broker_error("ApiVersions", resp.error_code, None));
        }
        self.versions = resp
            .api_keys
            .iter()
            .map(|k| (k.api_key, (k.min_version, k.max_version)))
            .collect();
        Ok(())
    }

    /// Sends `req` at `version` and waits for its response, within the request timeout.
    pub async fn send<R: Request<Response: 'static>>(
        &mut self,
        req: R,
        version: i16,
        call: &'static str,
    ) -> Result<R::Response> {
        let timeout = self.timeout;
        self.send_with_timeout(req, version, call, timeout).await
    }

    pub async fn send_with_timeout<R: Request<Response: 'static>>(
        &mut self,
        req: R,
        version: i16,
        call: &'static str,
        timeout: Duration,
    ) -> Result<R::Response> {
        self.reauthenticate_if_due().await?;
        self.exchange(req, version, call, timeout).await
    }

    /// One request and its response, with no re-authentication check (the SASL calls).
    async fn exchange<R: Request<Response: 'static>>(
        &mut self,
        req: R,
        version: i16,
        call: &'static str,
        timeout: Duration,
    ) -> Result<R::Response> {
        if !self.in_flight.is_empty() {
            return Err(Error::Protocol {
                call,
                why: format!(
                    "{} pipelined requests are still outstanding on this connection",
                    self.in_flight.len()
                ),
            });
        }
        let exchange = async {
            self.write_request(req, version, call).await?;
            self.read_response::<R>().await
        };
        let r = tokio::time::timeout(timeout, exchange).await;
        let r = r.unwrap_or_else(|_| Err(self.timed_out(call, timeout)));
        self.settle(r)
    }

    /// A request not answered (or not written) within `after`.
    fn timed_out(&self, call: &'static str, after: Duration) -> Error {
        Error::Timeout {
            call,
            broker: self.broker.clone(),
            after,
        }
    }

    /// Any error leaves the connection unusable.
    fn settle<T>(&mut self, r: Result<T>) -> Result<T> {
        self.broken |= r.is_err();
        r
    }

    /// Pipelining: writes `req` without waiting for the responses of the requests before it
    /// (Kafka answers a connection's requests in the order they came); its response is read
    /// by [`recv`](Self::recv), in order. Re-authenticates first when due and nothing is
    /// outstanding (KIP-368: never with requests in flight; the caller drains first when
    /// [`must_drain`](Self::must_drain) says so). An error leaves the connection unusable.
    pub async fn send_pipelined<R: Request<Response: 'static>>(
        &mut self,
        req: R,
        version: i16,
        call: &'static str,
    ) -> Result<()> {
        if self.in_flight.is_empty() {
            self.reauthenticate_if_due().await?;
        }
        let timeout = self.timeout;
        let r = tokio::time::timeout(timeout, self.write_request(req, version, call)).await;
        let r = r.unwrap_or_else(|_| Err(self.timed_out(call, timeout)));
        self.settle(r)
    }

    /// The response to the oldest outstanding pipelined request, which must be an `R`. No
    /// timeout (the caller bounds it); cancel-safe: a read cut short keeps what it read, so
    /// it can be raced against other work. A correlation id other than the request's is a
    /// protocol error, and any error leaves the connection unusable (drop it).
    pub async fn recv<R: Request<Response: 'static>>(&mut self) -> Result<R::Response> {
        let r = self.read_response::<R>().await;
        self.settle(r)
    }

    /// True when the session is due for re-authentication while requests are outstanding:
    /// read their responses before sending more (the next send re-authenticates).
    pub fn must_drain(&self) -> bool {
        !self.in_flight.is_empty() && self.reauth_at.is_some_and(|t| Instant::now() >= t)
    }

    /// Encodes and writes one request; it is then outstanding.
    async fn write_request<R: Request>(
        &mut self,
        req: R,
        version: i16,
        call: &'static str,
    ) -> Result<()> {
        if self.broken {
            return Err(self.unusable(call));
        }
        self.correlation = self.correlation.wrapping_add(1);
        let correlation = self.correlation;
        let header = RequestHeader::default()
            .with_request_api_key(R::KEY)
            .with_request_api_version(version)
            .with_correlation_id(correlation)
            .with_client_id(Some(self.client_id.clone()));
        let mut buf = BytesMut::with_capacity(256);
        buf.put_i32(0);
        header
            .encode(&mut buf, R::header_version(version))
            .map_err(|e| proto(call, e))?;
        req.encode(&mut buf, version).map_err(|e| proto(call, e))?;
        let len = (buf.len() - 4) as i32;
        buf[..4].copy_from_slice(&len.to_be_bytes());
        // Outstanding from the first byte written: a write cut short breaks the connection.
        self.broken = true;
        self.stream
            .write_all(&buf)
            .await
            .map_err(|e| io_error(&self.broker, call, e))?;
        self.stream
            .flush()
            .await
            .map_err(|e| io_error(&self.broker, call, e))?;
        self.broken = false;
        self.in_flight.push_back(Outstanding {
            correlation,
            api_key: R::KEY,
            version,
            call,
        });
        Ok(())
    }

    /// Reads and decodes the response to the oldest outstanding request (cancel-safe).
    async fn read_response<R: Request<Response: 'static>>(&mut self) -> Result<R::Response> {
        let Some(&Outstanding {
            correlation,
            api_key,
            version,
            call,
        }) = self.in_flight.front()
        else {
            return Err(Error::Protocol {
                call: "response",
                why: "no request outstanding".into(),
            });
        };
        if self.broken {
            return Err(self.unusable(call));
        }
        if api_key != R::KEY {
            return Err(Error::Protocol {
                call,
                why: format!("the outstanding request is API {api_key}, not {}", R::KEY),
            });
        }
        let mut frame = self.read_frame(call).await?;
        self.in_flight.pop_front();
        let rh = ResponseHeader::decode(&mut frame, R::Response::header_version(version))
            .map_err(|e| proto(call, e))?;
        if rh.correlation_id != correlation {
            return Err(Error::Protocol {
                call,
                why: format!(
                    "correlation id {} does not match request {correlation}",
                    rh.correlation_id
                ),
            });
        }
        let resp = decode_response::<R>(&mut frame, version).map_err(|e| proto(call, e))?;
        if frame.has_remaining() {
            tracing::trace!(
                call,
                left = frame.remaining(),
                "response has trailing bytes"
            );
        }
        Ok(resp)
    }

    /// One size-prefixed frame (without its size). Cancel-safe: bytes read stay in `rbuf`.
    async fn read_frame(&mut self, call: &'static str) -> Result<Bytes> {
        loop {
            if self.rbuf.len() >= 4 {
                let size =
                    i32::from_be_bytes([self.rbuf[0], self.rbuf[1], self.rbuf[2], self.rbuf[3]]);
                if size < 4 || size as usize > MAX_FRAME {
                    return Err(Error::Protocol {
                        call,
                        why: format!("bad response frame size {size}"),
                    });
                }
                let whole = 4 + size as usize;
                if self.rbuf.len() >= whole {
                    let mut frame = self.rbuf.split_to(whole);
                    frame.advance(4);
                    return Ok(frame.freeze());
                }
                if self.rbuf.capacity() < whole {
                    // The frame in a buffer of its exact size (what the fetcher hands out
                    // keeps it alive, and the fetch buffer counts its bytes).
                    let mut b = BytesMut::with_capacity(whole);
                    b.extend_from_slice(&self.rbuf);
                    self.rbuf = b;
                }
            } else {
                self.rbuf.reserve(4096);
            }
            let n = self
                .stream
                .read_buf(&mut self.rbuf)
                .await
                .map_err(|e| io_error(&self.broker, call, e))?;
            if n == 0 {
                return Err(io_error(
                    &self.broker,
                    call,
                    std::io::ErrorKind::UnexpectedEof.into(),
                ));
            }
        }
    }

    fn unusable(&self, call: &'static str) -> Error {
        Error::Io {
            call,
            broker: self.broker.clone(),
            why: "the connection failed earlier and cannot be used".into(),
        }
    }

    pub(crate) async fn sasl_handshake(&mut self, mechanism: &'static str) -> Result<Vec<String>> {
        let v = self.version::<SaslHandshakeRequest>("SaslHandshake", 1)?;
        let resp = self
            .exchange(
                SaslHandshakeRequest::default()
                    .with_mechanism(StrBytes::from_static_str(mechanism)),
                v,
                "SaslHandshake",
                self.timeout,
            )
            .await?;
        let offered: Vec<String> = resp.mechanisms.iter().map(|m| m.to_string()).collect();
        if resp.error_code != 0 {
            // A broker that offers the mechanism but refuses it (tansu does, for a second
            // handshake on one connection: it has no KIP-368 re-authentication).
            let why = if offered.iter().any(|m| m == mechanism) {
                format!(
                    "broker refused the handshake (error code {}) though it offers {mechanism}",
                    resp.error_code
                )
            } else {
                format!("broker offers {offered:?} only")
            };
            return Err(Error::Sasl { mechanism, why });
        }
        Ok(offered)
    }

    pub(crate) async fn sasl_authenticate(
        &mut self,
        mechanism: &'static str,
        bytes: Vec<u8>,
    ) -> Result<Vec<u8>> {
        let v = self.version::<SaslAuthenticateRequest>("SaslAuthenticate", 2)?;
        let resp = self
            .exchange(
                SaslAuthenticateRequest::default().with_auth_bytes(Bytes::from(bytes)),
                v,
                "SaslAuthenticate",
                self.timeout,
            )
            .await?;
        if resp.error_code != 0 {
            return Err(Error::Sasl {
                mechanism,
                why: resp
                    .error_message
                    .map(|m| m.to_string())
                    .unwrap_or_else(|| format!("error code {}", resp.error_code)),
            });
        }
        if resp.session_lifetime_ms > 0 {
            self.session_lifetime = Some(Duration::from_millis(resp.session_lifetime_ms as u64));
        }
        Ok(resp.auth_bytes.to_vec())
    }
}

/// A broker error code as a typed error.
pub fn broker_error(call: &'static str, code: i16, message: Option<&StrBytes>) -> Error {
    Error::Broker {
        call,
        code,
        error: kafka_protocol::error::ResponseError::try_from_code(code)
            .unwrap_or(kafka_protocol::error::ResponseError::Unknown(code)),
        message: message.map(|m| m.to_string()),
    }
}

/// Decodes a response body at `version`. A Fetch response that kafka-protocol refuses only for
/// a top-level tagged field it does not expect at that version (a broker that sends Fetch v16's
/// NodeEndpoints, tag 0, in a v12-v15 response, as tansu 0.6's sqlite build does) is decoded
/// again with that field kept as an unknown tagged field: tagged fields are optional by design,
/// and a reader skips the ones it does not know.
fn decode_response<R: Request<Response: 'static>>(
    frame: &mut Bytes,
    version: i16,
) -> std::result::Result<R::Response, String> {
    let body = frame.clone();
    match R::Response::decode(frame, version) {
        Ok(r) => Ok(r),
        Err(e) if R::KEY == FetchRequest::KEY && (12..16).contains(&version) => {
            let mut again = body;
            match fetch_tolerant(&mut again, version) {
                Ok(f) => {
                    tracing::debug!(%e, "Fetch response: misplaced tagged field skipped");
                    *frame = again;
                    let any: Box<dyn std::any::Any> = Box::new(f);
                    any.downcast::<R::Response>()
                        .map(|b| *b)
                        .map_err(|_| e.to_string())
                }
                Err(_) => Err(e.to_string()),
            }
        }
        Err(e) => Err(e.to_string()),
    }
}

/// FetchResponse v12-v15 as kafka-protocol decodes it, but with every top-level tagged field
/// kept as unknown (v12-v15 define none).
fn fetch_tolerant(buf: &mut Bytes, version: i16) -> std::result::Result<FetchResponse, String> {
    use kafka_protocol::messages::fetch_response::FetchableTopicResponse;
    fn varint(buf: &mut Bytes) -> std::result::Result<u32, String> {
        let mut v: u32 = 0;
        for i in 0..5 {
            if !buf.has_remaining() {
                return Err("short varint".into());
            }
            let b = buf.get_u8();
            v |= u32::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err("varint too long".into())
    }
    if buf.remaining() < 10 {
        return Err("short Fetch response".into());
    }
    let mut r = FetchResponse::default()
        .with_throttle_time_ms(buf.get_i32())
        .with_error_code(buf.get_i16())
        .with_session_id(buf.get_i32());
    // A compact array: its length + 1 (0 is null, which Fetch's `responses` is not).
    let topics = varint(buf)?.checked_sub(1).ok_or("null topic array")?;
    for _ in 0..topics {
        let t = FetchableTopicResponse::decode(buf, version).map_err(|e| e.to_string())?;
        r.responses.push(t);
    }
    for _ in 0..varint(buf)? {
        let tag = varint(buf)?;
        let size = varint(buf)? as usize;
        if buf.remaining() < size {
            return Err("short tagged field".into());
        }
        r.unknown_tagged_fields
            .insert(tag as i32, buf.split_to(size));
    }
    Ok(r)
}

/// An I/O error of a request. Under TLS 1.3 the broker refuses our certificate after the
/// handshake: its alert arrives on the first read, and says which setting to check.
fn io_error(broker: &str, call: &'static str, e: std::io::Error) -> Error {
    certificate_refused(broker, &e).unwrap_or_else(|| Error::Io {
        call,
        broker: broker.to_owned(),
        why: e.to_string(),
    })
}

fn proto(call: &'static str, e: impl std::fmt::Display) -> Error {
    Error::Protocol {
        call,
        why: e.to_string(),
    }
}

/// A failed TLS handshake: a certificate problem (named by the setting to check) or a
/// connection failure.
fn handshake_error(broker: &str, e: std::io::Error) -> Error {
    certificate_refused(broker, &e).unwrap_or_else(|| Error::Connect {
        broker: broker.to_owned(),
        why: format!("TLS handshake failed: {e}"),
    })
}

/// The certificate problem behind an I/O error of a TLS connection, if that is what it is.
fn certificate_refused(broker: &str, e: &std::io::Error) -> Option<Error> {
    let tls = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>());
    let setting = match tls {
        Some(rustls::Error::InvalidCertificate(_)) => {
            Some("KAFKA_SSL_CA_CERT / KAFKA_SSL_CA_CERT_FILE, and the broker address")
        }
        Some(rustls::Error::AlertReceived(
            rustls::AlertDescription::BadCertificate
            | rustls::AlertDescription::UnknownCA
            | rustls::AlertDescription::CertificateRequired
            | rustls::AlertDescription::CertificateUnknown
            | rustls::AlertDescription::CertificateExpired
            | rustls::AlertDescription::CertificateRevoked
            | rustls::AlertDescription::UnsupportedCertificate
            | rustls::AlertDescription::AccessDenied,
        )) => Some("KAFKA_SSL_CLIENT_CERT / KAFKA_SSL_CLIENT_KEY: the broker refused it"),
        _ => None,
    };
    setting.map(|setting| Error::Certificate {
        broker: broker.to_owned(),
        setting,
        why: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use kafka_protocol::messages::{
        TopicName,
        fetch_response::{FetchableTopicResponse, PartitionData},
    };

    use super::*;

    /// A v12 Fetch response with tag 0 (v16's NodeEndpoints) at the top, as tansu 0.6's sqlite
    /// build sends it: kafka-protocol alone refuses it; we keep the records.
    #[test]
    fn fetch_v12_with_a_v16_tag_is_read() {
        let records = Bytes::from_static(b"not-decoded-here");
        let resp = FetchResponse::default()
            .with_session_id(7)
            .with_responses(vec![
                FetchableTopicResponse::default()
                    .with_topic(TopicName(s("in")))
                    .with_partitions(vec![
                        PartitionData::default()
                            .with_partition_index(3)
                            .with_high_watermark(42)
                            .with_records(Some(records.clone())),
                    ]),
            ]);
        let mut buf = BytesMut::new();
        resp.encode(&mut buf, 12).unwrap();
        // The top-level tagged fields close the body: none (0) becomes one, tag 0, holding an
        // empty compact array of node endpoints (kafka-protocol will not encode it at v12).
        assert_eq!(buf.last(), Some(&0));
        buf.truncate(buf.len() - 1);
        buf.put_slice(&[1, 0, 1, 1]);
        let body = buf.freeze();

        let strict = FetchResponse::decode(&mut body.clone(), 12).unwrap_err();
        assert!(
            strict.to_string().contains("Tag 0 is not valid"),
            "{strict}"
        );
        let mut frame = body.clone();
        let got = decode_response::<FetchRequest>(&mut frame, 12).unwrap();
        assert!(!frame.has_remaining());
        assert_eq!(got.session_id, 7);
        let p = &got.responses[0].partitions[0];
        assert_eq!((p.partition_index, p.high_watermark), (3, 42));
        assert_eq!(p.records.as_ref(), Some(&records));

        // Any other damage is still an error.
        let mut cut = body.slice(..body.len() - 1);
        assert!(decode_response::<FetchRequest>(&mut cut, 12).is_err());
    }
}
