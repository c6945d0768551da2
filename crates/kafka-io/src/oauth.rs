//! SASL/OAUTHBEARER tokens (KIP-255, KIP-768): where a token comes from (an OIDC token endpoint
//! with client credentials, a token file, or an unsecured JWT for development), when it is
//! refreshed (at 80% of its lifetime, as the Java client does, on a timer started with the
//! cluster; with backoff while the source fails, keeping the current token until it expires),
//! and the client's first message.

use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use base64::{
    Engine,
    engine::general_purpose::{STANDARD as B64, URL_SAFE_NO_PAD as B64URL},
};

use crate::{
    error::{Error, Result},
    secret::Secret,
};

/// The settings of each token source, by librdkafka's `sasl.oauthbearer.*` names.
pub const ENDPOINT_SETTING: &str = "KAFKA_SASL_OAUTHBEARER_TOKEN_ENDPOINT_URL";
pub const CLIENT_SETTING: &str =
    "KAFKA_SASL_OAUTHBEARER_CLIENT_ID / KAFKA_SASL_OAUTHBEARER_CLIENT_SECRET";
pub const FILE_SETTING: &str = "KAFKA_SASL_OAUTHBEARER_TOKEN_FILE";
pub const CONFIG_SETTING: &str = "KAFKA_SASL_OAUTHBEARER_CONFIG";

/// The share of a token's lifetime after which it is refreshed.
const REFRESH_AT: f64 = 0.8;
/// A token endpoint's answer must come within this.
const HTTP_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the timer ([`TokenSource::spawn_refresher`]) looks at a token file for a change.
const FILE_POLL: Duration = Duration::from_secs(10);
/// Backoff between failed refreshes while the current token is still valid.
const BACKOFF_MIN: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(60);

/// `KAFKA_SASL_OAUTHBEARER_METHOD`: how tokens are obtained.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OauthMethod {
    /// OIDC client credentials (KIP-768; librdkafka's `sasl.oauthbearer.method=oidc`).
    Oidc {
        token_endpoint_url: String,
        client_id: String,
        client_secret: Secret,
        scope: Option<String>,
    },
    /// A token file (a projected service-account token, say), re-read when it changes.
    File(PathBuf),
    /// An unsigned JWT (`alg: none`) naming `principal`: development brokers only.
    Unsecured {
        principal: String,
        lifetime: Duration,
    },
    /// AWS MSK IAM: a SigV4-presigned kafka-cluster:Connect URL as the token.
    AwsMskIam(crate::aws::MskIam),
}

impl OauthMethod {
    pub fn name(&self) -> &'static str {
        match self {
            Self::Oidc { .. } => "oidc",
            Self::File(_) => "file",
            Self::Unsecured { .. } => "unsecured",
            Self::AwsMskIam(_) => "aws_msk_iam",
        }
    }
}

/// An OAUTHBEARER configuration: the token source and the SASL extensions sent with each token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OauthSettings {
    pub method: OauthMethod,
    /// `KAFKA_SASL_OAUTHBEARER_EXTENSIONS`: key=value pairs (e.g. Confluent Cloud's
    /// logicalCluster and identityPoolId).
    pub extensions: Vec<(String, String)>,
}

/// Parses `key=value,key=value` (librdkafka's `sasl.oauthbearer.extensions`). Keys are letters
/// only and not `auth` (RFC 7628 section 3.1); values are printable ASCII, spaces and tabs.
pub fn parse_extensions(
    setting: &'static str,
    text: &str,
) -> std::result::Result<Vec<(String, String)>, crate::error::ConfigError> {
    let bad = |why: String| crate::error::ConfigError::Invalid { setting, why };
    let mut out = Vec::new();
    for pair in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (k, v) = pair
            .split_once('=')
            .ok_or_else(|| bad(format!("`{pair}` is not key=value")))?;
        let (k, v) = (k.trim(), v.trim());
        if k.is_empty() || !k.bytes().all(|b| b.is_ascii_alphabetic()) {
            return Err(bad(format!("key `{k}` must be letters only (RFC 7628)")));
        }
        if k == "auth" {
            return Err(bad("`auth` is reserved for the token".into()));
        }
        if v.is_empty() || !v.bytes().all(|b| (0x20..=0x7e).contains(&b) || b == b'\t') {
            return Err(bad(format!(
                "the value of `{k}` must be printable ASCII and not empty"
            )));
        }
        out.push((k.to_owned(), v.to_owned()));
    }
    Ok(out)
}

/// The client's first (and only) message, exactly KIP-255's:
/// `n,[a=authzid],\x01auth=Bearer <token>\x01key=value\x01...\x01\x01`.
pub fn client_first_message(
    token: &str,
    authzid: Option<&str>,
    extensions: &[(String, String)],
) -> Vec<u8> {
    let mut m = Vec::with_capacity(token.len() + 64);
    m.extend_from_slice(b"n,");
    if let Some(a) = authzid {
        m.extend_from_slice(b"a=");
        // RFC 5801 saslname: ',' and '=' escaped.
        m.extend_from_slice(a.replace('=', "=3D").replace(',', "=2C").as_bytes());
    }
    m.extend_from_slice(b",\x01auth=Bearer ");
    m.extend_from_slice(token.as_bytes());
    for (k, v) in extensions {
        m.push(1);
        m.extend_from_slice(k.as_bytes());
        m.push(b'=');
        m.extend_from_slice(v.as_bytes());
    }
    m.extend_from_slice(b"\x01\x01");
    m
}

/// An unsigned JWT (`{"alg":"none"}`) for `principal`, issued now and valid for `lifetime`.
pub fn unsecured_jwt(principal: &str, lifetime: Duration) -> Secret {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let header = B64URL.encode(br#"{"alg":"none"}"#);
    let claims = serde_json::json!({
        "sub": principal,
        "iat": now,
        "exp": now + lifetime.as_secs().max(1),
    });
    let body = B64URL.encode(claims.to_string());
    Secret::new(format!("{header}.{body}."))
}

/// The lifetime left of a JWT, from its `exp` claim (None: not a JWT, or no `exp`).
fn jwt_remaining(token: &str) -> Option<Duration> {
    let claims = token.split('.').nth(1)?;
    let json = B64URL.decode(claims.trim_end_matches('=')).ok()?;
    let exp = serde_json::from_slice::<serde_json::Value>(&json)
        .ok()?
        .get("exp")?
        .as_f64()?;
    let now = SystemTime::now().duration_since(UNIX_EPOCH).ok()?;
    Some(Duration::from_secs_f64((exp - now.as_secs_f64()).max(0.0)))
}

struct Cached {
    token: Secret,
    refresh_at: Instant,
    expires_at: Instant,
    /// The token file's modification time when read.
    mtime: Option<SystemTime>,
}

#[derive(Default)]
struct State {
    current: Option<Cached>,
    failures: u32,
    retry_at: Option<Instant>,
    /// Tokens obtained so far (for tests and the log).
    fetched: u64,
}

pub(crate) type HttpClient = hyper_util::client::legacy::Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    http_body_util::Full<bytes::Bytes>,
>;

struct Inner {
    settings: OauthSettings,
    http_timeout: Duration,
    state: tokio::sync::Mutex<State>,
    http: std::sync::OnceLock<HttpClient>,
    /// The timer of [`TokenSource::spawn_refresher`] runs.
    refresher: std::sync::atomic::AtomicBool,
}

/// Where tokens come from, shared by every connection made with the same settings (ours and
/// rskafka's): one cache, one refresh at a time. Two are equal when they are the same source.
#[derive(Clone)]
pub struct TokenSource(Arc<Inner>);

impl std::fmt::Debug for TokenSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The client secret is a Secret; tokens are never part of it.
        f.debug_struct("TokenSource")
            .field("settings", &self.0.settings)
            .finish_non_exhaustive()
    }
}

impl PartialEq for TokenSource {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for TokenSource {}

impl TokenSource {
    pub fn new(settings: OauthSettings) -> Self {
        Self::with_http_timeout(settings, HTTP_TIMEOUT)
    }

    /// The same, a token endpoint's answer awaited at most `http_timeout`.
    pub fn with_http_timeout(settings: OauthSettings, http_timeout: Duration) -> Self {
        Self(Arc::new(Inner {
            settings,
            http_timeout,
            state: tokio::sync::Mutex::new(State::default()),
            http: std::sync::OnceLock::new(),
            refresher: std::sync::atomic::AtomicBool::new(false),
        }))
    }

    pub fn settings(&self) -> &OauthSettings {
        &self.0.settings
    }

    /// How long until the current token is refreshed (None: no token yet).
    pub async fn refresh_in(&self) -> Option<Duration> {
        let st = self.0.state.lock().await;
        st.current
            .as_ref()
            .map(|c| c.refresh_at.saturating_duration_since(Instant::now()))
    }

    /// Refreshes the token on a timer: at 80% of its lifetime (a token file is also looked at
    /// every [`FILE_POLL`]), after the backoff while the source fails. So a connection that
    /// opens or re-authenticates (KIP-368) finds a fresh token waiting, and a failing endpoint
    /// is logged before any connection needs it. The task ends once every other clone of this
    /// source is dropped. One timer per source: None when it runs already.
    pub fn spawn_refresher(&self) -> Option<tokio::task::JoinHandle<()>> {
        if self
            .0
            .refresher
            .swap(true, std::sync::atomic::Ordering::AcqRel)
        {
            return None;
        }
        let weak = Arc::downgrade(&self.0);
        Some(tokio::spawn(async move {
            loop {
                let Some(inner) = weak.upgrade() else {
                    return;
                };
                let src = TokenSource(inner);
                let _ = src.token().await;
                let wait = {
                    let st = src.0.state.lock().await;
                    let now = Instant::now();
                    let next = match (&st.current, st.retry_at) {
                        (_, Some(retry)) => retry,
                        (Some(c), None) => c.refresh_at,
                        (None, None) => now + BACKOFF_MIN,
                    };
                    let mut wait = next.saturating_duration_since(now);
                    if matches!(src.0.settings.method, OauthMethod::File(_)) {
                        wait = wait.min(FILE_POLL);
                    }
                    wait.max(Duration::from_millis(50))
                };
                drop(src);
                tokio::time::sleep(wait).await;
            }
        }))
    }

    /// How many tokens were obtained so far.
    pub async fn fetched(&self) -> u64 {
        self.0.state.lock().await.fetched
    }

    /// A valid token: the cached one until 80% of its lifetime (or, for a file, until the file
    /// changes), then a new one. While the source fails, the current token is used until it
    /// expires, with retries backing off; without a valid token the failure is the answer
    /// ([`Error::Token`], naming the setting).
    pub async fn token(&self) -> Result<Secret> {
        let mut st = self.0.state.lock().await;
        let now = Instant::now();
        let mtime = match &self.0.settings.method {
            OauthMethod::File(p) => tokio::fs::metadata(p).await.and_then(|m| m.modified()).ok(),
            _ => None,
        };
        if let Some(c) = &st.current {
            let file_changed = matches!(self.0.settings.method, OauthMethod::File(_))
                && mtime.is_some()
                && mtime != c.mtime;
            if now < c.refresh_at && !file_changed {
                return Ok(c.token.clone());
            }
            if now < c.expires_at && st.retry_at.is_some_and(|r| now < r) {
                return Ok(c.token.clone());
            }
        }
        match self.obtain(mtime).await {
            Ok(c) => {
                let token = c.token.clone();
                st.current = Some(c);
                st.failures = 0;
                st.retry_at = None;
                st.fetched += 1;
                tracing::debug!(
                    method = self.0.settings.method.name(),
                    "OAUTHBEARER token obtained"
                );
                Ok(token)
            }
            Err(e) => {
                st.failures = st.failures.saturating_add(1);
                let wait = BACKOFF_MIN
                    .saturating_mul(1 << st.failures.min(8))
                    .min(BACKOFF_MAX);
                st.retry_at = Some(now + wait);
                match &st.current {
                    Some(c) if now < c.expires_at => {
                        tracing::warn!(error = %e, retry_in = ?wait,
                            "cannot refresh the OAUTHBEARER token; using the current one until it expires");
                        Ok(c.token.clone())
                    }
                    _ => Err(e),
                }
            }
        }
    }

    async fn obtain(&self, mtime: Option<SystemTime>) -> Result<Cached> {
        let now = Instant::now();
        let cached = |token: Secret, lifetime: Option<Duration>, mtime| {
            let (refresh_at, expires_at) = match lifetime {
                Some(l) => (now + l.mul_f64(REFRESH_AT), now + l),
                // No expiry known (an opaque token in a file): kept until the file changes.
                None => {
                    let far = now + Duration::from_secs(365 * 24 * 3600);
                    (far, far)
                }
            };
            Cached {
                token,
                refresh_at,
                expires_at,
                mtime,
            }
        };
        match &self.0.settings.method {
            OauthMethod::Unsecured {
                principal,
                lifetime,
            } => Ok(cached(
                unsecured_jwt(principal, *lifetime),
                Some(*lifetime),
                None,
            )),
            OauthMethod::AwsMskIam(msk) => {
                let client = self.0.http.get_or_init(http_client);
                let mut creds = msk.credentials.fetch(client, self.0.http_timeout).await?;
                if let Some(role) = &msk.assume_role {
                    creds = role
                        .assume(&creds, &msk.region, client, self.0.http_timeout)
                        .await?;
                }
                let now = SystemTime::now();
                // The token lives 15 minutes, or less when the credentials end sooner.
                let lifetime = creds
                    .expires
                    .and_then(|e| e.duration_since(now).ok())
                    .map_or(crate::aws::TOKEN_LIFETIME, |left| {
                        left.min(crate::aws::TOKEN_LIFETIME)
                    });
                if lifetime.is_zero() {
                    return Err(Error::Token {
                        setting: crate::aws::CREDENTIALS_SETTING,
                        why: "the AWS credentials have expired".into(),
                    });
                }
                Ok(cached(
                    crate::aws::msk_token(&msk.region, &creds, now),
                    Some(lifetime),
                    None,
                ))
            }
            OauthMethod::File(path) => {
                let bad = |why: String| Error::Token {
                    setting: FILE_SETTING,
                    why,
                };
                let text = tokio::fs::read_to_string(path)
                    .await
                    .map(Secret::new)
                    .map_err(|e| bad(format!("cannot read {}: {e}", path.display())))?;
                let token = Secret::new(text.expose().trim());
                if token.expose().is_empty() {
                    return Err(bad(format!("{} is empty", path.display())));
                }
                let left = jwt_remaining(token.expose());
                if left == Some(Duration::ZERO) {
                    return Err(bad(format!("the token in {} has expired", path.display())));
                }
                Ok(cached(token, left, mtime))
            }
            OauthMethod::Oidc {
                token_endpoint_url,
                client_id,
                client_secret,
                scope,
            } => {
                let (token, lifetime) = self
                    .client_credentials(token_endpoint_url, client_id, client_secret, scope)
                    .await?;
                Ok(cached(token, Some(lifetime), None))
            }
        }
    }

    /// POST grant_type=client_credentials (RFC 6749 section 4.4) with HTTP basic auth.
    async fn client_credentials(
        &self,
        url: &str,
        client_id: &str,
        client_secret: &Secret,
        scope: &Option<String>,
    ) -> Result<(Secret, Duration)> {
        let bad = |setting: &'static str, why: String| Error::Token { setting, why };
        let mut body = String::from("grant_type=client_credentials");
        if let Some(s) = scope {
            body.push_str("&scope=");
            body.push_str(&form_encode(s));
        }
        let basic = Secret::new(format!(
            "Basic {}",
            B64.encode(format!("{client_id}:{}", client_secret.expose()))
        ));
        let client = self.0.http.get_or_init(http_client);
        let (status, body) = http_call(
            client,
            "POST",
            url,
            &[
                ("content-type", "application/x-www-form-urlencoded"),
                ("accept", "application/json"),
                ("authorization", basic.expose()),
            ],
            body,
            self.0.http_timeout,
        )
        .await
        .map_err(|why| bad(ENDPOINT_SETTING, why))?;
        let json: Option<serde_json::Value> = serde_json::from_slice(&body).ok();
        if !status.is_success() {
            // RFC 6749 section 5.2: error and error_description (never the token).
            let said = json
                .as_ref()
                .map(|j| {
                    [j.get("error"), j.get("error_description")]
                        .into_iter()
                        .flatten()
                        .filter_map(|v| v.as_str())
                        .collect::<Vec<_>>()
                        .join(": ")
                })
                .filter(|s| !s.is_empty())
                .map(|s| format!(" ({})", s.chars().take(200).collect::<String>()))
                .unwrap_or_default();
            let setting = if matches!(status.as_u16(), 400 | 401 | 403) {
                CLIENT_SETTING
            } else {
                ENDPOINT_SETTING
            };
            return Err(bad(
                setting,
                format!("the token endpoint {url} answered {status}{said}"),
            ));
        }
        let json = json.ok_or_else(|| {
            bad(
                ENDPOINT_SETTING,
                format!("the token endpoint {url} did not answer JSON"),
            )
        })?;
        let token = json
            .get("access_token")
            .and_then(|t| t.as_str())
            .filter(|t| !t.is_empty())
            .map(Secret::new)
            .ok_or_else(|| {
                bad(
                    ENDPOINT_SETTING,
                    format!("the answer of {url} has no access_token"),
                )
            })?;
        let lifetime = json
            .get("expires_in")
            .and_then(|e| e.as_f64().or_else(|| e.as_str()?.parse().ok()))
            .filter(|s| *s > 0.0)
            .map(Duration::from_secs_f64)
            .or_else(|| jwt_remaining(token.expose()).filter(|d| !d.is_zero()))
            .ok_or_else(|| {
                bad(
                    ENDPOINT_SETTING,
                    format!("the answer of {url} has no expires_in and the token no exp"),
                )
            })?;
        Ok((token, lifetime))
    }
}

/// The HTTP client for token endpoints (and AWS's): http or https (Mozilla roots), HTTP/1.1.
fn http_client() -> HttpClient {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    let tls = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
        .with_safe_default_protocol_versions()
        .expect("ring supports the default versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
    http.enforce_http(false);
    http.set_connect_timeout(Some(Duration::from_secs(5)));
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build(https)
}

/// One HTTP request and its whole answer, within `within`; the error says why (no secrets:
/// neither headers nor body are repeated).
pub(crate) async fn http_call(
    client: &HttpClient,
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: String,
    within: Duration,
) -> std::result::Result<(hyper::StatusCode, bytes::Bytes), String> {
    use http_body_util::BodyExt;
    let uri: hyper::Uri = url
        .parse()
        .map_err(|e| format!("`{url}` is not a URL: {e}"))?;
    let mut req = hyper::Request::builder().method(method).uri(uri);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req
        .body(http_body_util::Full::new(bytes::Bytes::from(body)))
        .map_err(|e| e.to_string())?;
    let exchange = async {
        let resp = client.request(req).await.map_err(|e| {
            use std::error::Error as _;
            let mut why = e.to_string();
            let mut src = e.source();
            while let Some(s) = src {
                why = format!("{why}: {s}");
                src = s.source();
            }
            format!("cannot reach {url}: {why}")
        })?;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("reading the answer: {e}"))?
            .to_bytes();
        Ok((status, body))
    };
    tokio::time::timeout(within, exchange)
        .await
        .map_err(|_| format!("{url} did not answer within {within:?}"))?
}

/// application/x-www-form-urlencoded for one value.
fn form_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                out.push(b as char)
            }
            b' ' => out.push('+'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn first_message_is_kip_255s() {
        let ext = vec![
            ("logicalCluster".to_string(), "lkc-abc".to_string()),
            ("identityPoolId".to_string(), "pool-1".to_string()),
        ];
        assert_eq!(
            client_first_message("tok.en", None, &ext),
            b"n,,\x01auth=Bearer tok.en\x01logicalCluster=lkc-abc\x01identityPoolId=pool-1\x01\x01"
        );
        assert_eq!(
            client_first_message("t", Some("a=b,c"), &[]),
            b"n,a=a=3Db=2Cc,\x01auth=Bearer t\x01\x01"
        );
    }

    #[test]
    fn extensions_follow_rfc_7628() {
        let e = parse_extensions("X", "logicalCluster=lkc-1, identityPoolId=pool-2").unwrap();
        assert_eq!(
            e,
            [
                ("logicalCluster".into(), "lkc-1".into()),
                ("identityPoolId".into(), "pool-2".into())
            ]
        );
        for bad in ["auth=x", "k1=v", "novalue", "k=", "k=\u{1}"] {
            let err = parse_extensions("KAFKA_SASL_OAUTHBEARER_EXTENSIONS", bad).unwrap_err();
            assert!(
                err.to_string()
                    .starts_with("KAFKA_SASL_OAUTHBEARER_EXTENSIONS"),
                "{err}"
            );
        }
    }

    #[test]
    fn unsecured_jwt_names_the_principal_and_expires() {
        let t = unsecured_jwt("alice", Duration::from_secs(600));
        let parts: Vec<&str> = t.expose().split('.').collect();
        assert_eq!(parts.len(), 3);
        assert_eq!(B64URL.decode(parts[0]).unwrap(), br#"{"alg":"none"}"#);
        let claims: serde_json::Value =
            serde_json::from_slice(&B64URL.decode(parts[1]).unwrap()).unwrap();
        assert_eq!(claims["sub"], "alice");
        assert_eq!(
            claims["exp"].as_u64().unwrap() - claims["iat"].as_u64().unwrap(),
            600
        );
        assert_eq!(parts[2], "");
        let left = jwt_remaining(t.expose()).unwrap();
        assert!(left > Duration::from_secs(590) && left <= Duration::from_secs(600));
    }

    /// A token endpoint on 127.0.0.1 speaking HTTP/1.1 over real TCP: each request is kept
    /// (head and body) and answered with the next of `answers` (status, body); the last one
    /// repeats.
    pub(crate) struct Endpoint {
        pub(crate) url: String,
        pub(crate) seen: Arc<std::sync::Mutex<Vec<(String, String)>>>,
        task: tokio::task::JoinHandle<()>,
    }

    impl Drop for Endpoint {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    pub(crate) async fn endpoint(answers: Vec<(u16, String)>) -> Endpoint {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/oauth2/token", l.local_addr().unwrap());
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let log = seen.clone();
        let task = tokio::spawn(async move {
            for n in 0.. {
                let Ok((mut s, _)) = l.accept().await else {
                    return;
                };
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                let (head, body) = loop {
                    let Ok(k) = s.read(&mut chunk).await else {
                        break (String::new(), String::new());
                    };
                    if k == 0 {
                        break (String::new(), String::new());
                    }
                    buf.extend_from_slice(&chunk[..k]);
                    let text = String::from_utf8_lossy(&buf).to_string();
                    if let Some((head, body)) = text.split_once("\r\n\r\n") {
                        let len = head
                            .lines()
                            .find_map(|l| {
                                l.to_ascii_lowercase()
                                    .strip_prefix("content-length:")
                                    .map(|v| v.trim().parse::<usize>().unwrap())
                            })
                            .unwrap_or(0);
                        if body.len() >= len {
                            break (head.to_owned(), body.to_owned());
                        }
                    }
                };
                log.lock().unwrap().push((head, body));
                let (status, answer) = answers[n.min(answers.len() - 1)].clone();
                let resp = format!(
                    "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{answer}",
                    answer.len()
                );
                let _ = s.write_all(resp.as_bytes()).await;
                let _ = s.shutdown().await;
            }
        });
        Endpoint { url, seen, task }
    }

    fn oidc(url: &str, scope: Option<&str>) -> TokenSource {
        TokenSource::new(OauthSettings {
            method: OauthMethod::Oidc {
                token_endpoint_url: url.to_owned(),
                client_id: "kafka-infer".into(),
                client_secret: "s3cr3t:pw".into(),
                scope: scope.map(str::to_owned),
            },
            extensions: vec![],
        })
    }

    fn token_answer(n: u32, expires_in: u32) -> (u16, String) {
        (
            200,
            format!(
                r#"{{"access_token":"tok-{n}","token_type":"Bearer","expires_in":{expires_in}}}"#
            ),
        )
    }

    /// The client-credentials request is RFC 6749's (basic auth, grant_type, scope), and a
    /// token of 2 s is used until 80% of its lifetime, then replaced.
    #[tokio::test]
    async fn client_credentials_request_and_refresh_at_80_percent() {
        let ep = endpoint(vec![token_answer(1, 2), token_answer(2, 2)]).await;
        let src = oidc(&ep.url, Some("kafka read"));
        let start = Instant::now();
        assert_eq!(src.token().await.unwrap().expose(), "tok-1");
        {
            let seen = ep.seen.lock().unwrap();
            let (head, body) = &seen[0];
            assert!(head.starts_with("POST /oauth2/token HTTP/1.1"), "{head}");
            let lower = head.to_ascii_lowercase();
            assert!(
                lower.contains("content-type: application/x-www-form-urlencoded"),
                "{head}"
            );
            let basic = B64.encode("kafka-infer:s3cr3t:pw");
            assert!(head.contains(&format!("Basic {basic}")), "{head}");
            assert_eq!(body, "grant_type=client_credentials&scope=kafka+read");
        }
        // Well before 80%: the cached token, no new request.
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(src.token().await.unwrap().expose(), "tok-1");
        assert_eq!(ep.seen.lock().unwrap().len(), 1);
        // Polled every 50 ms (at most 60 times): replaced once 1.6 s have passed.
        let mut replaced = None;
        for _ in 0..60 {
            tokio::time::sleep(Duration::from_millis(50)).await;
            if src.token().await.unwrap().expose() == "tok-2" {
                replaced = Some(start.elapsed());
                break;
            }
        }
        let at = replaced.expect("the token was not refreshed within 3.5 s");
        assert!(
            at >= Duration::from_millis(1600) && at < Duration::from_millis(2500),
            "refreshed after {at:?}"
        );
        assert_eq!(ep.seen.lock().unwrap().len(), 2);
        assert_eq!(src.fetched().await, 2);
    }

    /// The timer refreshes a 2 s token at 80% of its lifetime with no connection asking, and
    /// stops once the source is dropped.
    #[tokio::test]
    async fn the_refresher_renews_the_token_with_no_one_asking() {
        let ep = endpoint(vec![
            token_answer(1, 2),
            token_answer(2, 2),
            token_answer(3, 2),
        ])
        .await;
        let src = oidc(&ep.url, None);
        let task = src.spawn_refresher().expect("the first timer");
        assert!(src.spawn_refresher().is_none(), "one timer per source");
        // Polled every 50 ms (at most 80 times): the first token at once, the second at 1.6 s.
        let mut fetched = 0;
        for _ in 0..80 {
            tokio::time::sleep(Duration::from_millis(50)).await;
            fetched = src.fetched().await;
            if fetched >= 2 {
                break;
            }
        }
        assert_eq!(
            fetched, 2,
            "the refresher did not renew the token within 4 s"
        );
        assert_eq!(src.token().await.unwrap().expose(), "tok-2");
        drop(src);
        tokio::time::timeout(Duration::from_secs(3), task)
            .await
            .expect("the refresher ends once the source is gone")
            .unwrap();
        assert_eq!(ep.seen.lock().unwrap().len(), 2);
    }

    /// A failing refresh keeps the valid token (backing off, not asking on every call); once
    /// it has expired the failure is the answer, naming the setting and not the secret.
    #[tokio::test]
    async fn failing_refresh_keeps_the_token_until_it_expires() {
        let ep = endpoint(vec![
            token_answer(1, 2),
            (503, r#"{"error":"temporarily_unavailable"}"#.into()),
        ])
        .await;
        let src = oidc(&ep.url, None);
        assert_eq!(src.token().await.unwrap().expose(), "tok-1");
        assert_eq!(
            ep.seen.lock().unwrap()[0].1,
            "grant_type=client_credentials"
        );
        tokio::time::sleep(Duration::from_millis(1700)).await;
        assert_eq!(src.token().await.unwrap().expose(), "tok-1");
        assert_eq!(ep.seen.lock().unwrap().len(), 2, "refresh tried once");
        assert_eq!(src.token().await.unwrap().expose(), "tok-1");
        assert_eq!(ep.seen.lock().unwrap().len(), 2, "backing off");
        tokio::time::sleep(Duration::from_millis(1200)).await;
        let e = src.token().await.unwrap_err().to_string();
        assert!(
            e.starts_with(ENDPOINT_SETTING)
                && e.contains("503")
                && e.contains("temporarily_unavailable"),
            "{e}"
        );
        assert!(!e.contains("s3cr3t") && !e.contains("tok-1"), "{e}");
    }

    #[tokio::test]
    async fn endpoint_down_or_refusing_is_named() {
        // A port nothing listens on (bound, then closed).
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let src = oidc(&format!("http://127.0.0.1:{port}/token"), None);
        let e = src.token().await.unwrap_err();
        assert!(
            matches!(
                e,
                Error::Token {
                    setting: ENDPOINT_SETTING,
                    ..
                }
            ),
            "{e:?}"
        );
        let text = e.to_string();
        assert!(
            text.starts_with("KAFKA_SASL_OAUTHBEARER_TOKEN_ENDPOINT_URL: cannot get an OAUTHBEARER token: cannot reach"),
            "{text}"
        );
        assert!(!e.is_retryable());
        let ep = endpoint(vec![(401, r#"{"error":"invalid_client"}"#.into())]).await;
        let e = oidc(&ep.url, None).token().await.unwrap_err().to_string();
        assert!(
            e.starts_with(CLIENT_SETTING) && e.contains("401") && e.contains("invalid_client"),
            "{e}"
        );
        assert!(!e.contains("s3cr3t"), "{e}");
        let ep = endpoint(vec![(200, r#"{"token_type":"Bearer"}"#.into())]).await;
        let e = oidc(&ep.url, None).token().await.unwrap_err().to_string();
        assert!(e.contains("no access_token"), "{e}");
    }

    /// A token endpoint that accepts the connection but does not answer is given up on after
    /// the HTTP timeout (10 s by default; 300 ms here), naming the setting.
    #[tokio::test]
    async fn slow_endpoint_times_out_naming_the_setting() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/token", l.local_addr().unwrap());
        let hold = tokio::spawn(async move {
            let (_s, _) = l.accept().await.unwrap();
            tokio::time::sleep(Duration::from_secs(30)).await;
        });
        let src = TokenSource::with_http_timeout(
            OauthSettings {
                method: OauthMethod::Oidc {
                    token_endpoint_url: url,
                    client_id: "id".into(),
                    client_secret: "hush".into(),
                    scope: None,
                },
                extensions: vec![],
            },
            Duration::from_millis(300),
        );
        let t = Instant::now();
        let e = tokio::time::timeout(Duration::from_secs(5), src.token())
            .await
            .expect("bounded by the HTTP timeout")
            .unwrap_err()
            .to_string();
        hold.abort();
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
        assert!(
            e.starts_with(ENDPOINT_SETTING) && e.contains("did not answer within 300ms"),
            "{e}"
        );
    }

    /// A token file is re-read when it changes (a rotated projected token); an expired JWT in
    /// it is refused naming the setting.
    #[tokio::test]
    async fn token_file_is_re_read_when_it_changes() {
        let path = std::env::temp_dir().join(format!("kafka-io-{}-token", std::process::id()));
        std::fs::write(&path, "opaque-a\n").unwrap();
        let src = TokenSource::new(OauthSettings {
            method: OauthMethod::File(path.clone()),
            extensions: vec![],
        });
        assert_eq!(src.token().await.unwrap().expose(), "opaque-a");
        assert_eq!(src.token().await.unwrap().expose(), "opaque-a");
        assert_eq!(src.fetched().await, 1);
        std::fs::write(&path, "opaque-b\n").unwrap();
        let f = std::fs::File::options().write(true).open(&path).unwrap();
        f.set_modified(SystemTime::now() + Duration::from_secs(5))
            .unwrap();
        drop(f);
        assert_eq!(src.token().await.unwrap().expose(), "opaque-b");
        assert_eq!(src.fetched().await, 2);
        // A JWT that has expired.
        let claims = B64URL.encode(r#"{"sub":"a","exp":1000}"#);
        std::fs::write(&path, format!("eyJhbGciOiJub25lIn0.{claims}.")).unwrap();
        let f = std::fs::File::options().write(true).open(&path).unwrap();
        f.set_modified(SystemTime::now() + Duration::from_secs(10))
            .unwrap();
        drop(f);
        let e = src.token().await;
        // Still the rotated token: it has no expiry, so it stays valid while the file is bad.
        assert_eq!(e.unwrap().expose(), "opaque-b");
        let fresh = TokenSource::new(OauthSettings {
            method: OauthMethod::File(path.clone()),
            extensions: vec![],
        });
        let e = fresh.token().await.unwrap_err().to_string();
        assert!(e.starts_with(FILE_SETTING) && e.contains("expired"), "{e}");
        std::fs::remove_file(&path).unwrap();
        let e = TokenSource::new(OauthSettings {
            method: OauthMethod::File(path.clone()),
            extensions: vec![],
        })
        .token()
        .await
        .unwrap_err()
        .to_string();
        assert!(
            e.starts_with(FILE_SETTING) && e.contains("cannot read"),
            "{e}"
        );
    }

    #[test]
    fn form_values_are_encoded() {
        assert_eq!(form_encode("a b/c:d&e"), "a+b%2Fc%3Ad%26e");
    }
}
