//! What travels with one record through the graph besides its payload: the request id, the
//! Kafka headers forwarded to every node (HTTP headers or gRPC metadata), W3C trace context,
//! and the `x-*` headers the models answer with (copied to the output record).

use std::sync::Mutex;

use bytes::Bytes;
use codec::Protocol;
use http::{HeaderMap, HeaderName, HeaderValue};

/// Record headers never sent to a model, even when `--forward-headers` names them: they
/// describe the Kafka payload (its form, our error headers), are HTTP connection-level or
/// framing (hop-by-hop), reserved by gRPC, or set by us (the request id, trace context).
/// Compared after [`normalize`].
const NEVER_FORWARDED: &[&str] = &[
    "proto-name",
    "content-type",
    "content-length",
    "content-encoding",
    "accept",
    "accept-encoding",
    "host",
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "http2-settings",
    "expect",
    "user-agent",
    "traceparent",
    "tracestate",
    "seldon-puid",
    "x-request-id",
];

/// Prefixes of names never sent (ours, gRPC's).
const NEVER_FORWARDED_PREFIXES: &[&str] = &["kafka-infer-", "grpc-"];

/// Record headers not sent unless `--forward-headers` names them: credentials, and what
/// proxies and servers trust about the client or the route (anyone who can write to the input
/// topic could otherwise impersonate a user or steer a proxy in front of the model). Compared
/// after [`normalize`].
const WITHHELD: &[&str] = &[
    "authorization",
    "proxy-authorization",
    "cookie",
    "x-api-key",
    "x-auth-token",
    "forwarded",
    "via",
    "x-real-ip",
    "x-client-ip",
    "true-client-ip",
    "x-http-method-override",
];

/// Prefixes of names not sent unless named (`x-forwarded-for`, `x-envoy-retry-on`, ...); a
/// pattern names them only if it is itself within the prefix (`x-forwarded-*`, not `x-*`).
const WITHHELD_PREFIXES: &[&str] = &["x-forwarded-", "x-envoy-", "x-original-"];

/// A header name as servers compare it: lower case, `_` read as `-` (WSGI servers such as
/// gunicorn, and CGI, turn both into the same `HTTP_X_REQUEST_ID`).
pub fn normalize(name: &str) -> String {
    name.bytes()
        .map(|b| match b {
            b'_' => '-',
            b => char::from(b.to_ascii_lowercase()),
        })
        .collect()
}

/// Which record headers go to the model (`--forward-headers`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HeaderPolicy {
    /// Every header (as Seldon's executor does), except [`NEVER_FORWARDED`] and
    /// [`WITHHELD`] ones (and names ending in `-bin`, binary gRPC metadata).
    All,
    /// Names, or prefixes ending in `*` (e.g. `x-*`), compared after [`normalize`]. A
    /// [`WITHHELD`] header is sent when named here (a prefix names it only from within its
    /// family: `x-forwarded-*`, not `x-*` or `*`).
    Only(Vec<String>),
}

impl HeaderPolicy {
    /// `*` (all), `none` (only the request id and trace context), or a comma-separated list
    /// (which may hold `*`: `*,authorization` is everything sent by default plus
    /// `authorization`).
    pub fn parse(s: &str) -> Self {
        let s = s.trim();
        if s == "*" {
            return Self::All;
        }
        if s.eq_ignore_ascii_case("none") {
            return Self::Only(Vec::new());
        }
        Self::Only(
            s.split(',')
                .map(|p| normalize(p.trim()))
                .filter(|p| !p.is_empty())
                .collect(),
        )
    }

    fn allows(&self, name: &str) -> bool {
        let name = normalize(name);
        if NEVER_FORWARDED.contains(&name.as_str())
            || NEVER_FORWARDED_PREFIXES.iter().any(|p| name.starts_with(p))
            || name.ends_with("-bin")
        {
            return false;
        }
        let withheld = WITHHELD.contains(&name.as_str())
            || WITHHELD_PREFIXES.iter().any(|p| name.starts_with(p));
        match self {
            Self::All => !withheld,
            Self::Only(list) => list.iter().any(|p| match p.strip_suffix('*') {
                Some(prefix) => {
                    name.starts_with(prefix)
                        && (!withheld || WITHHELD_PREFIXES.iter().any(|w| prefix.starts_with(w)))
                }
                None => name == *p,
            }),
        }
    }
}

/// W3C trace context of one record: the caller's trace, with our own span (the record's
/// processing) as the parent of the model calls and of the output record's readers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Trace {
    pub trace_id: [u8; 16],
    /// Our span: the parent id of everything we send.
    pub span_id: [u8; 8],
    /// The span of whoever wrote the input record, if it said.
    pub parent_id: Option<[u8; 8]>,
    pub flags: u8,
    pub state: Option<String>,
}

impl Trace {
    /// Continues a valid `traceparent` (version 00 format; later versions read by their
    /// first four fields, as the spec asks), else None.
    pub fn continue_from(traceparent: &[u8], tracestate: Option<&[u8]>) -> Option<Self> {
        let s = std::str::from_utf8(traceparent).ok()?.trim();
        let mut parts = s.split('-');
        let (version, trace, parent, flags) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        if hex_lower::<1>(version)? == [0xff] {
            return None;
        }
        if version == "00" && parts.next().is_some() {
            return None;
        }
        let trace_id: [u8; 16] = hex_lower(trace)?;
        let parent_id: [u8; 8] = hex_lower(parent)?;
        let [flags]: [u8; 1] = hex_lower(flags)?;
        if trace_id == [0; 16] || parent_id == [0; 8] {
            return None;
        }
        Some(Self {
            trace_id,
            span_id: new_span_id(),
            parent_id: Some(parent_id),
            flags,
            state: tracestate
                .and_then(|t| std::str::from_utf8(t).ok())
                .map(|t| t.trim().to_owned())
                .filter(|t| !t.is_empty()),
        })
    }

    /// A new sampled trace (when spans are exported and the record brought none).
    pub fn start() -> Self {
        let mut trace_id = [0u8; 16];
        while trace_id == [0; 16] {
            trace_id = fastrand::u128(..).to_be_bytes();
        }
        Self {
            trace_id,
            span_id: new_span_id(),
            parent_id: None,
            flags: 1,
            state: None,
        }
    }

    pub fn sampled(&self) -> bool {
        self.flags & 1 == 1
    }

    /// The `traceparent` we send: the trace, with our span as the parent.
    pub fn traceparent(&self) -> String {
        traceparent(self.trace_id, self.span_id, self.flags)
    }

    pub fn trace_id_hex(&self) -> String {
        hex(&self.trace_id)
    }
}

/// A version 00 `traceparent` value.
pub fn traceparent(trace_id: [u8; 16], parent_id: [u8; 8], flags: u8) -> String {
    format!("00-{}-{}-{flags:02x}", hex(&trace_id), hex(&parent_id))
}

/// Sets `traceparent` on headers sent to a model.
pub fn set_traceparent(h: &mut HeaderMap, value: &str) {
    h.insert(
        HeaderName::from_static("traceparent"),
        HeaderValue::from_str(value).expect("traceparent is ASCII"),
    );
}

fn new_span_id() -> [u8; 8] {
    let mut id = [0u8; 8];
    while id == [0; 8] {
        id = fastrand::u64(..).to_be_bytes();
    }
    id
}

pub(crate) fn hex(b: &[u8]) -> String {
    let mut s = String::with_capacity(b.len() * 2);
    push_hex(&mut s, b);
    s
}

/// Appends the lower-case hex of `b` (a table look-up per nibble: this runs for every record).
fn push_hex(s: &mut String, b: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for x in b {
        s.push(char::from(DIGITS[usize::from(x >> 4)]));
        s.push(char::from(DIGITS[usize::from(x & 0x0f)]));
    }
}

/// Lower-case hex of exactly N bytes (W3C trace context forbids upper case).
fn hex_lower<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.len() != N * 2
        || !s
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return None;
    }
    let mut out = [0u8; N];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[i * 2..i * 2 + 2], 16).ok()?;
    }
    Some(out)
}

/// A new request id: a random UUID (version 4 form).
pub fn new_request_id() -> String {
    uuid_form(fastrand::u128(..))
}

/// The request id of a record that brought none: a UUID-form FNV-1a hash of where it was
/// read, the same each time the record is redone.
pub fn request_id_of(topic: &str, partition: i32, offset: i64) -> String {
    const PRIME: u128 = 0x0000000001000000000000000000013B;
    let mut h: u128 = 0x6c62272e07bb014262b821756295c58d;
    let sep = [0xffu8];
    for part in [
        topic.as_bytes(),
        &sep,
        &partition.to_be_bytes(),
        &sep,
        &offset.to_be_bytes(),
    ] {
        for b in part {
            h ^= u128::from(*b);
            h = h.wrapping_mul(PRIME);
        }
    }
    uuid_form(h)
}

fn uuid_form(v: u128) -> String {
    let mut b = v.to_be_bytes();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let mut s = String::with_capacity(36);
    for (i, group) in [&b[..4], &b[4..6], &b[6..8], &b[8..10], &b[10..]]
        .into_iter()
        .enumerate()
    {
        if i > 0 {
            s.push('-');
        }
        push_hex(&mut s, group);
    }
    s
}

/// The request id's header: `Seldon-Puid` for the seldon protocol (as Seldon's executor),
/// `x-request-id` for the others (as MLServer, Seldon v2 and most HTTP servers).
pub fn request_id_header(p: Protocol) -> &'static str {
    match p {
        Protocol::Seldon => "Seldon-Puid",
        Protocol::Tensorflow | Protocol::V2 => "x-request-id",
    }
}

/// One record's context for its model calls.
#[derive(Debug)]
pub struct RecordMeta {
    pub request_id: String,
    /// The record's `Seldon-Skip-Logging` (true, on, 1): no payload-logger events for it.
    pub skip_logging: bool,
    pub request_id_header: &'static str,
    pub trace: Option<Trace>,
    /// Headers sent with every model call: the forwarded record headers, the request id, the
    /// trace context.
    pub to_model: HeaderMap,
    /// `x-*` headers the models answered with, in call order (a later node's value wins).
    answered: Mutex<Vec<(String, Bytes)>>,
    /// The branch each router took (Seldon's meta.routing).
    routing: Mutex<Vec<(String, i64)>>,
    /// The record's exported span (OpenTelemetry export on); ends when this is dropped.
    pub span: Option<crate::otel::RecordSpan>,
}

impl RecordMeta {
    /// `origin`: the record's topic, partition and offset, from which a record without a
    /// request id gets one that stays the same when it is redone (after a crash or a
    /// rebalance); None: a random one.
    pub fn of_record(
        headers: &[(String, Bytes)],
        protocol: Protocol,
        policy: &HeaderPolicy,
        origin: Option<(&str, i32, i64)>,
    ) -> Self {
        let get = |name: &str| {
            headers
                .iter()
                .rev()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_ref())
        };
        let request_id_header = request_id_header(protocol);
        // The protocol's own header first, then the other one (a record written for Seldon
        // may reach a v2 model, and the other way round).
        let request_id = [request_id_header, "seldon-puid", "x-request-id"]
            .iter()
            .filter_map(|n| get(n))
            .filter_map(|v| std::str::from_utf8(v).ok())
            .map(str::trim)
            .find(|v| !v.is_empty() && v.bytes().all(|b| (0x20..0x7f).contains(&b)))
            .map_or_else(
                || origin.map_or_else(new_request_id, |(t, p, o)| request_id_of(t, p, o)),
                str::to_owned,
            );
        let trace = get("traceparent").and_then(|tp| Trace::continue_from(tp, get("tracestate")));

        let mut to_model = HeaderMap::new();
        for (k, v) in headers {
            if !policy.allows(k) {
                continue;
            }
            // Only what HTTP/1, HTTP/2 and gRPC metadata can all carry: names of
            // [0-9a-z_.-] (gRPC's rule; HTTP names are case-insensitive), visible ASCII
            // values. Binary headers stay on the record.
            if !k.bytes().all(|b| {
                b.is_ascii_digit() || b.is_ascii_alphabetic() || matches!(b, b'_' | b'.' | b'-')
            }) {
                continue;
            }
            let (Ok(name), Ok(value)) = (
                HeaderName::from_bytes(k.as_bytes()),
                HeaderValue::from_bytes(v),
            ) else {
                continue;
            };
            if v.iter().all(|b| (0x20..0x7f).contains(b)) {
                to_model.append(name, value);
            }
        }
        to_model.insert(
            HeaderName::from_bytes(request_id_header.as_bytes()).expect("a valid name"),
            HeaderValue::from_str(&request_id).expect("checked or generated"),
        );
        if let Some(t) = &trace {
            set_traceparent(&mut to_model, &t.traceparent());
            if let Some(s) = t
                .state
                .as_deref()
                .and_then(|s| HeaderValue::from_str(s).ok())
            {
                to_model.insert(HeaderName::from_static("tracestate"), s);
            }
        }
        let skip_logging = get("seldon-skip-logging")
            .and_then(|v| std::str::from_utf8(v).ok())
            .is_some_and(|v| matches!(v.trim().to_ascii_lowercase().as_str(), "true" | "on" | "1"));
        Self {
            request_id,
            skip_logging,
            request_id_header,
            trace,
            to_model,
            answered: Mutex::new(Vec::new()),
            routing: Mutex::new(Vec::new()),
            span: None,
        }
    }

    /// Exports this record's span (a new trace if the record brought none); the model calls and
    /// the output record then carry its trace context.
    pub fn trace_with(
        &mut self,
        tracing: &crate::otel::Tracing,
        topic: &str,
        partition: i32,
        offset: i64,
    ) {
        let mut trace = self.trace.take().unwrap_or_else(Trace::start);
        self.span = Some(tracing.record(&mut trace, topic, partition, offset, &self.request_id));
        set_traceparent(&mut self.to_model, &trace.traceparent());
        self.trace = Some(trace);
    }

    /// Takes what a batch's call learned (the models' headers, the routes) as this record's.
    pub fn absorb(&self, batch: &RecordMeta) {
        let answered = batch.answered.lock().expect("not poisoned").clone();
        self.answered.lock().expect("not poisoned").extend(answered);
        *self.routing.lock().expect("not poisoned") = batch.routing();
    }

    /// Notes the branch a node took (Seldon's Routing map: -1 for calls and aggregates).
    pub fn routed(&self, node: &str, route: i64) {
        let mut r = self.routing.lock().expect("not poisoned");
        match r.iter_mut().find(|(n, _)| n == node) {
            Some(e) => e.1 = route,
            None => r.push((node.to_owned(), route)),
        }
    }

    /// The branches routers took, in the order they decided.
    pub fn routing(&self) -> Vec<(String, i64)> {
        self.routing.lock().expect("not poisoned").clone()
    }

    /// Keeps a model's `x-*` response headers (not its echo of the request id).
    pub fn answered_with(&self, headers: &HeaderMap) {
        let mut a = self.answered.lock().expect("not poisoned");
        for (k, v) in headers {
            let k = k.as_str();
            if k.starts_with("x-") && !k.eq_ignore_ascii_case(self.request_id_header) {
                a.retain(|(n, _)| n != k);
                a.push((k.to_owned(), Bytes::copy_from_slice(v.as_bytes())));
            }
        }
    }

    /// The headers our output (or error) record adds: the request id, the trace context, and
    /// (for answers) the models' `x-*` headers.
    pub fn record_headers(&self, with_model_headers: bool) -> Vec<(String, Bytes)> {
        let mut out = vec![(
            self.request_id_header.to_owned(),
            Bytes::from(self.request_id.clone()),
        )];
        if let Some(t) = &self.trace {
            out.push(("traceparent".into(), Bytes::from(t.traceparent())));
            if let Some(s) = &t.state {
                out.push(("tracestate".into(), Bytes::from(s.clone())));
            }
        }
        if with_model_headers {
            out.extend(self.answered.lock().expect("not poisoned").iter().cloned());
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(pairs: &[(&str, &[u8])]) -> Vec<(String, Bytes)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), Bytes::copy_from_slice(v)))
            .collect()
    }

    #[test]
    fn request_ids_are_uuid_shaped_and_stable() {
        assert_eq!(uuid_form(0), "00000000-0000-4000-8000-000000000000");
        assert_eq!(uuid_form(u128::MAX), "ffffffff-ffff-4fff-bfff-ffffffffffff");
        assert_eq!(
            uuid_form(0x0123456789abcdef_0123456789abcdef),
            "01234567-89ab-4def-8123-456789abcdef"
        );
        let id = request_id_of("in", 3, 42);
        assert_eq!(id, request_id_of("in", 3, 42));
        assert_ne!(id, request_id_of("in", 3, 43));
        assert_eq!(hex(&[0x00, 0x9f, 0xa0]), "009fa0");
    }

    #[test]
    fn traceparent_is_continued_with_a_new_span() {
        let tp = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let t = Trace::continue_from(tp, Some(b"congo=t61rcWkgMzE")).unwrap();
        assert_eq!(t.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(
            t.parent_id,
            Some([0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7])
        );
        let out = t.traceparent();
        assert!(out.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"));
        assert!(out.ends_with("-01"));
        assert_ne!(&out[36..52], "00f067aa0ba902b7");
        assert_eq!(t.state.as_deref(), Some("congo=t61rcWkgMzE"));
    }

    #[test]
    fn invalid_traceparents_are_ignored() {
        for bad in [
            &b"00-00000000000000000000000000000000-00f067aa0ba902b7-01"[..],
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            b"00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            b"ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            b"00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            b"garbage",
            b"zz-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            b"\xff\xfe",
        ] {
            assert!(Trace::continue_from(bad, None).is_none(), "{bad:?}");
        }
        // A later version is read by its first four fields.
        assert!(
            Trace::continue_from(
                b"01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-more",
                None
            )
            .is_some()
        );
    }

    #[test]
    fn request_id_comes_from_the_record_or_is_generated() {
        let p = HeaderPolicy::All;
        let m = RecordMeta::of_record(&h(&[("Seldon-Puid", b"abc")]), Protocol::Seldon, &p, None);
        assert_eq!(m.request_id, "abc");
        assert_eq!(m.to_model.get("seldon-puid").unwrap(), "abc");
        let m = RecordMeta::of_record(&h(&[("x-request-id", b"r1")]), Protocol::V2, &p, None);
        assert_eq!(m.request_id, "r1");
        assert_eq!(
            m.record_headers(false)[0],
            ("x-request-id".into(), Bytes::from("r1"))
        );
        let a = RecordMeta::of_record(&[], Protocol::V2, &p, None);
        let b = RecordMeta::of_record(&[], Protocol::V2, &p, None);
        assert_eq!(a.request_id.len(), 36);
        assert_ne!(a.request_id, b.request_id);
        // A value no header can carry is replaced.
        let m = RecordMeta::of_record(&h(&[("x-request-id", b"a\nb")]), Protocol::V2, &p, None);
        assert_ne!(m.request_id, "a\nb");
        // Without one, the same record (redone) gets the same id; another record another.
        let at = |o| RecordMeta::of_record(&[], Protocol::V2, &p, Some(("in", 2, o))).request_id;
        assert_eq!(at(7), at(7));
        assert_ne!(at(7), at(8));
        assert_eq!(at(7).len(), 36);
    }

    #[test]
    fn forwarding_follows_the_policy() {
        let rec = h(&[
            ("tenant", b"t1"),
            ("x-user", b"u"),
            ("proto-name", b"seldon.protos.SeldonMessage"),
            ("content-type", b"application/json"),
            ("kafka-infer-error", b"old"),
            ("bin", b"\x00\x01"),
            ("bad name", b"v"),
            ("grpc-timeout", b"1S"),
            ("trace-bin", b"abc"),
            ("odd!name", b"v"),
        ]);
        let all = RecordMeta::of_record(&rec, Protocol::Seldon, &HeaderPolicy::All, None);
        let names: Vec<_> = all.to_model.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["tenant", "x-user", "seldon-puid"]);
        let only = RecordMeta::of_record(&rec, Protocol::V2, &HeaderPolicy::parse("x-*"), None);
        let names: Vec<_> = only.to_model.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["x-user", "x-request-id"]);
        let none = RecordMeta::of_record(&rec, Protocol::V2, &HeaderPolicy::parse("none"), None);
        assert_eq!(none.to_model.len(), 1);
    }

    #[test]
    fn credentials_and_proxy_headers_are_sent_only_when_named() {
        let rec = h(&[
            ("tenant", b"t1"),
            ("Authorization", b"Bearer secret"),
            ("proxy_authorization", b"Basic x"),
            ("cookie", b"session=1"),
            ("Forwarded", b"for=1.2.3.4"),
            ("X-Forwarded-For", b"1.2.3.4"),
            ("x_forwarded_host", b"evil"),
            ("x-real-ip", b"1.2.3.4"),
            ("x-envoy-retry-on", b"5xx"),
            ("x_request_id", b"spoofed"),
            ("seldon_puid", b"spoofed"),
            ("Content_Length", b"0"),
            ("kafka_infer_error", b"old"),
            ("x-user", b"u"),
        ]);
        let sent = |policy: &str, p: Protocol| -> Vec<String> {
            RecordMeta::of_record(&rec, p, &HeaderPolicy::parse(policy), None)
                .to_model
                .keys()
                .map(|k| k.as_str().to_owned())
                .collect()
        };
        assert_eq!(
            sent("*", Protocol::V2),
            ["tenant", "x-user", "x-request-id"]
        );
        assert_eq!(
            sent("*", Protocol::Seldon),
            ["tenant", "x-user", "seldon-puid"]
        );
        // The request id is ours, whatever the spelling.
        let m = RecordMeta::of_record(&rec, Protocol::V2, &HeaderPolicy::All, None);
        assert_ne!(m.to_model.get("x-request-id").unwrap(), "spoofed");
        // A wide pattern does not name them; a name or the family's own pattern does.
        assert_eq!(sent("x-*", Protocol::V2), ["x-user", "x-request-id"]);
        assert_eq!(
            sent("*,AUTHORIZATION,x-forwarded-*", Protocol::V2),
            [
                "tenant",
                "authorization",
                "x-forwarded-for",
                "x_forwarded_host",
                "x-user",
                "x-request-id"
            ]
        );
        assert_eq!(
            sent(
                "proxy-authorization,cookie,x-envoy-*,x-real-ip,forwarded",
                Protocol::V2
            ),
            [
                "proxy_authorization",
                "cookie",
                "forwarded",
                "x-real-ip",
                "x-envoy-retry-on",
                "x-request-id"
            ]
        );
        // Never sent, even when named (any spelling).
        assert_eq!(
            sent(
                "x_request_id,seldon-puid,content-length,kafka-infer-*",
                Protocol::V2
            ),
            ["x-request-id"]
        );
        assert_eq!(normalize("X_Request-ID"), "x-request-id");
    }

    #[test]
    fn model_headers_reach_the_record_once_each() {
        let m = RecordMeta::of_record(&[], Protocol::V2, &HeaderPolicy::All, None);
        let mut a = HeaderMap::new();
        a.insert("x-model-version", HeaderValue::from_static("1"));
        a.insert("x-request-id", HeaderValue::from_static("echo"));
        a.insert("server", HeaderValue::from_static("uvicorn"));
        m.answered_with(&a);
        a.insert("x-model-version", HeaderValue::from_static("2"));
        m.answered_with(&a);
        let h = m.record_headers(true);
        assert_eq!(h.len(), 2, "{h:?}");
        assert_eq!(h[1], ("x-model-version".into(), Bytes::from("2")));
        assert_eq!(m.record_headers(false).len(), 1);
    }
}
