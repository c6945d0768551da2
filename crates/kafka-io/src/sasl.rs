//! SASL: PLAIN and SCRAM-SHA-256/512 (rsasl does the mechanism's work) and OAUTHBEARER
//! (KIP-255, written here) on our own connections, and the same credentials handed to rskafka
//! for its connections (OAUTHBEARER through its token callback, fed by the same token source).

use std::{io::Cursor, sync::Arc};

use crate::{
    conn::BrokerConn,
    error::{Error, Result},
    settings::{SaslMechanism, SaslSettings},
};

/// The same credentials for rskafka's connections.
pub fn rskafka_config(s: &SaslSettings) -> rskafka::client::SaslConfig {
    if let (SaslMechanism::OauthBearer, Some(source)) = (s.mechanism, &s.oauth) {
        let bearer_kvs = source.settings().extensions.clone();
        let source = source.clone();
        let callback: rskafka::client::OauthCallback = Arc::new(move || {
            let source = source.clone();
            Box::pin(async move {
                source
                    .token()
                    .await
                    .map(|t| t.expose().to_owned())
                    .map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)
            })
        });
        return rskafka::client::SaslConfig::Oauthbearer(rskafka::client::OauthBearerCredentials {
            callback,
            authz_id: None,
            bearer_kvs,
        });
    }
    let c = rskafka::client::Credentials::new(s.username.clone(), s.password.expose().to_owned());
    match s.mechanism {
        SaslMechanism::Plain => rskafka::client::SaslConfig::Plain(c),
        SaslMechanism::ScramSha256 => rskafka::client::SaslConfig::ScramSha256(c),
        SaslMechanism::ScramSha512 => rskafka::client::SaslConfig::ScramSha512(c),
        // Without a token source (not from the settings' parser): PLAIN's shape, refused by
        // the broker.
        SaslMechanism::OauthBearer => rskafka::client::SaslConfig::Plain(c),
    }
}

/// The PBKDF2 iteration counts a SCRAM server may ask for. Fewer make a captured exchange
/// cheap to crack offline (RFC 7677 asks for at least 4096); more would keep a CPU busy for
/// minutes per connection (the count is the server's to choose, up to 2^32-1).
pub const SCRAM_ITERATIONS: std::ops::RangeInclusive<u64> = 4096..=1_000_000;

/// The iteration count (`i=`) of a SCRAM server-first message, checked against
/// [`SCRAM_ITERATIONS`] before any key derivation. A message without a readable count is left
/// for rsasl to refuse.
pub(crate) fn check_scram_iterations(mechanism: &'static str, server_first: &[u8]) -> Result<()> {
    let Some(count) = std::str::from_utf8(server_first)
        .ok()
        .and_then(|m| m.split(',').find_map(|a| a.strip_prefix("i=")))
        .and_then(|i| i.parse::<u64>().ok())
    else {
        return Ok(());
    };
    if SCRAM_ITERATIONS.contains(&count) {
        Ok(())
    } else {
        Err(Error::ScramIterations {
            mechanism,
            count,
            min: *SCRAM_ITERATIONS.start(),
            max: *SCRAM_ITERATIONS.end(),
        })
    }
}

/// What a refused PLAIN/SCRAM exchange tells the user to check.
const CHECK: &str =
    "check KAFKA_SASL_USERNAME and KAFKA_SASL_PASSWORD (or KAFKA_SASL_PASSWORD_FILE)";

/// Runs the SASL exchange over `conn` (rsasl does the mechanism's work). Each step runs on
/// tokio's blocking pool: SCRAM's PBKDF2 derivation would otherwise hold the runtime thread
/// (and with it /live) for as long as the server's iteration count makes it take.
pub(crate) async fn authenticate(conn: &mut BrokerConn, s: &SaslSettings) -> Result<()> {
    use rsasl::prelude::{Mechname, SASLClient, SASLConfig};
    let mech = s.mechanism.name();
    if s.mechanism == SaslMechanism::OauthBearer {
        return oauthbearer(conn, s).await;
    }
    let fail = |why: String| Error::Sasl {
        mechanism: mech,
        why,
    };
    conn.sasl_handshake(mech).await?;
    let config = SASLConfig::with_credentials(None, s.username.clone(), s.password.expose().into())
        .map_err(|e| fail(e.to_string()))?;
    let client = SASLClient::new(config);
    let name = Mechname::parse(mech.as_bytes()).map_err(|e| fail(e.to_string()))?;
    let mut session = client
        .start_suggested(&[name])
        .map_err(|e| fail(e.to_string()))?;
    let scram = s.mechanism != SaslMechanism::Plain;
    let mut received: Option<Vec<u8>> = None;
    for step in 0..8 {
        // SCRAM's second step derives the key from the server-first message's count.
        if scram
            && step == 1
            && let Some(first) = &received
        {
            check_scram_iterations(mech, first)?;
        }
        let (back, input, stepped) = tokio::task::spawn_blocking(move || {
            let mut out = Cursor::new(Vec::new());
            let state = session.step(received.as_deref(), &mut out);
            (session, received, state.map(|st| (st, out.into_inner())))
        })
        .await
        .map_err(|e| fail(format!("the SASL step did not finish: {e}")))?;
        (session, received) = (back, input);
        // SCRAM's third step reads the server-final message: a failure there is the broker's
        // verdict (`e=invalid-proof`), i.e. a wrong user or password.
        let (state, out) = stepped.map_err(|e| {
            if scram && step == 2 {
                fail(format!("the broker refused the credentials ({e}); {CHECK}"))
            } else {
                fail(e.to_string())
            }
        })?;
        if state.has_sent_message() {
            received = Some(
                conn.sasl_authenticate(mech, out)
                    .await
                    .map_err(|e| match e {
                        // The broker refused the exchange: almost always a wrong user or password.
                        Error::Sasl { why, .. } => fail(format!(
                            "the broker refused the credentials ({why}); {CHECK}"
                        )),
                        e => e,
                    })?,
            );
        }
        if state.is_finished() {
            return Ok(());
        }
    }
    Err(fail("exchange did not finish".into()))
}

/// OAUTHBEARER (KIP-255, RFC 7628): one client message with the token and the extensions.
/// The broker answers nothing on success; on failure it sends an error JSON (`status`, RFC 7628
/// section 3.2.2), the client answers `\x01`, and the broker ends the exchange with its error.
async fn oauthbearer(conn: &mut BrokerConn, s: &SaslSettings) -> Result<()> {
    let mech = SaslMechanism::OauthBearer.name();
    let source = s.oauth.as_ref().ok_or_else(|| Error::Sasl {
        mechanism: mech,
        why: "no token source configured".into(),
    })?;
    // The token first: a token endpoint that is down is named as such, not as a broker fault.
    let token = source.token().await?;
    conn.sasl_handshake(mech).await?;
    let first =
        crate::oauth::client_first_message(token.expose(), None, &source.settings().extensions);
    drop(token);
    let challenge = conn.sasl_authenticate(mech, first).await?;
    if challenge.is_empty() {
        return Ok(());
    }
    let status = serde_json::from_slice::<serde_json::Value>(&challenge)
        .ok()
        .map(|j| {
            let field = |k: &str| j.get(k).and_then(|v| v.as_str()).map(str::to_owned);
            let mut out = format!("status {}", field("status").unwrap_or_else(|| "?".into()));
            if let Some(scope) = field("scope") {
                out.push_str(&format!(", scope {scope}"));
            }
            out
        })
        .unwrap_or_else(|| "an unreadable error answer".into());
    let end = match conn.sasl_authenticate(mech, vec![1]).await {
        Err(Error::Sasl { why, .. }) => format!(": {why}"),
        Err(e) => return Err(e),
        Ok(_) => String::new(),
    };
    Err(Error::Sasl {
        mechanism: mech,
        why: format!("the broker refused the token ({status}){end}"),
    })
}

#[cfg(test)]
mod tests {
    //! Our SASL client against a mock broker whose SCRAM server side is written here from
    //! RFC 5802 / RFC 7677 (independent of rsasl), over real Kafka framing.

    use std::{
        sync::Arc,
        time::{Duration, Instant},
    };

    use base64::{Engine, engine::general_purpose::STANDARD as B64};
    use bytes::{Buf, BufMut, Bytes, BytesMut};
    use hmac::{Mac, digest::KeyInit};
    use kafka_protocol::{
        messages::{
            ApiKey, ApiVersionsResponse, RequestHeader, ResponseHeader, SaslAuthenticateRequest,
            SaslAuthenticateResponse, SaslHandshakeRequest, SaslHandshakeResponse,
            api_versions_response::ApiVersion,
        },
        protocol::{Decodable, Encodable, HeaderVersion, StrBytes},
    };
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::TcpListener,
    };

    use crate::{
        conn::Connector,
        error::Error,
        settings::{ConnectionSettings, SaslMechanism, SaslSettings, SecurityProtocol},
    };

    const USER: &str = "alice";
    const PASSWORD: &str = "wonder-land";

    fn hmac(mech: SaslMechanism, key: &[u8], data: &[u8]) -> Vec<u8> {
        match mech {
            SaslMechanism::ScramSha512 => {
                let mut m = <hmac::Hmac<sha2::Sha512> as KeyInit>::new_from_slice(key).unwrap();
                m.update(data);
                m.finalize().into_bytes().to_vec()
            }
            _ => {
                let mut m = <hmac::Hmac<sha2::Sha256> as KeyInit>::new_from_slice(key).unwrap();
                m.update(data);
                m.finalize().into_bytes().to_vec()
            }
        }
    }

    fn hash(mech: SaslMechanism, data: &[u8]) -> Vec<u8> {
        use sha2::Digest;
        match mech {
            SaslMechanism::ScramSha512 => sha2::Sha512::digest(data).to_vec(),
            _ => sha2::Sha256::digest(data).to_vec(),
        }
    }

    fn salted(mech: SaslMechanism, password: &str, salt: &[u8], i: u32) -> Vec<u8> {
        match mech {
            SaslMechanism::ScramSha512 => {
                let mut out = [0u8; 64];
                pbkdf2::pbkdf2_hmac::<sha2::Sha512>(password.as_bytes(), salt, i, &mut out);
                out.to_vec()
            }
            _ => {
                let mut out = [0u8; 32];
                pbkdf2::pbkdf2_hmac::<sha2::Sha256>(password.as_bytes(), salt, i, &mut out);
                out.to_vec()
            }
        }
    }

    /// The server half of one SCRAM exchange (RFC 5802 section 3).
    struct ScramServer {
        mech: SaslMechanism,
        salt: Vec<u8>,
        iterations: u32,
        client_first_bare: String,
        server_first: String,
    }

    impl ScramServer {
        fn first(&mut self, msg: &str) -> Result<String, String> {
            let bare = msg.strip_prefix("n,,").ok_or("bad gs2 header")?;
            let nonce = bare
                .split(',')
                .find_map(|a| a.strip_prefix("r="))
                .ok_or("no nonce")?;
            let user = bare
                .split(',')
                .find_map(|a| a.strip_prefix("n="))
                .ok_or("no user")?;
            if user != USER {
                return Err(format!("unknown user {user}"));
            }
            self.client_first_bare = bare.to_owned();
            self.server_first = format!(
                "r={nonce}srvNonce42,s={},i={}",
                B64.encode(&self.salt),
                self.iterations
            );
            Ok(self.server_first.clone())
        }

        /// `salted`: the salted password (derived off the runtime, as the client's is).
        fn last(&mut self, msg: &str, salted: &[u8]) -> Result<String, String> {
            let (without_proof, proof) = msg.rsplit_once(",p=").ok_or("no proof")?;
            let proof = B64.decode(proof).map_err(|e| e.to_string())?;
            let client_key = hmac(self.mech, salted, b"Client Key");
            let stored_key = hash(self.mech, &client_key);
            let auth = format!(
                "{},{},{}",
                self.client_first_bare, self.server_first, without_proof
            );
            let sig = hmac(self.mech, &stored_key, auth.as_bytes());
            let recovered: Vec<u8> = proof.iter().zip(&sig).map(|(a, b)| a ^ b).collect();
            if hash(self.mech, &recovered) != stored_key {
                return Err("Authentication failed during authentication due to invalid credentials with SASL mechanism".into());
            }
            let server_key = hmac(self.mech, salted, b"Server Key");
            Ok(format!(
                "v={}",
                B64.encode(hmac(self.mech, &server_key, auth.as_bytes()))
            ))
        }
    }

    async fn read_frame(s: &mut tokio::net::TcpStream) -> Option<Bytes> {
        let n = s.read_i32().await.ok()?;
        let mut buf = vec![0; n as usize];
        s.read_exact(&mut buf).await.ok()?;
        Some(Bytes::from(buf))
    }

    async fn reply<R: Encodable + HeaderVersion>(
        s: &mut tokio::net::TcpStream,
        correlation: i32,
        resp: R,
        version: i16,
    ) {
        let mut b = BytesMut::new();
        b.put_i32(0);
        ResponseHeader::default()
            .with_correlation_id(correlation)
            .encode(&mut b, R::header_version(version))
            .unwrap();
        resp.encode(&mut b, version).unwrap();
        let n = (b.len() - 4) as i32;
        b[..4].copy_from_slice(&n.to_be_bytes());
        s.write_all(&b).await.unwrap();
    }

    /// A one-connection broker that speaks ApiVersions, SaslHandshake and SaslAuthenticate.
    async fn mock_broker(mech: SaslMechanism) -> u16 {
        mock_broker_with(mech, 4096).await
    }

    /// The same, its SCRAM side asking for `iterations`.
    async fn mock_broker_with(mech: SaslMechanism, iterations: u32) -> u16 {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut scram = ScramServer {
                mech,
                salt: b"pinch of salt".to_vec(),
                iterations,
                client_first_bare: String::new(),
                server_first: String::new(),
            };
            let mut step = 0;
            while let Some(mut frame) = read_frame(&mut s).await {
                let key = ApiKey::try_from(frame.clone().get_i16()).unwrap();
                let version = frame.clone().slice(2..).get_i16();
                let h =
                    RequestHeader::decode(&mut frame, key.request_header_version(version)).unwrap();
                let c = h.correlation_id;
                match key {
                    ApiKey::ApiVersions => {
                        let keys = [(18, 0, 3), (17, 0, 1), (36, 0, 2)]
                            .map(|(k, lo, hi)| {
                                ApiVersion::default()
                                    .with_api_key(k)
                                    .with_min_version(lo)
                                    .with_max_version(hi)
                            })
                            .to_vec();
                        reply(
                            &mut s,
                            c,
                            ApiVersionsResponse::default().with_api_keys(keys),
                            version,
                        )
                        .await;
                    }
                    ApiKey::SaslHandshake => {
                        let req = SaslHandshakeRequest::decode(&mut frame, version).unwrap();
                        let ok = req.mechanism.as_str() == mech.name();
                        let resp = SaslHandshakeResponse::default()
                            .with_error_code(if ok { 0 } else { 33 })
                            .with_mechanisms(vec![StrBytes::from_static_str(mech.name())]);
                        reply(&mut s, c, resp, version).await;
                    }
                    ApiKey::SaslAuthenticate => {
                        let req = SaslAuthenticateRequest::decode(&mut frame, version).unwrap();
                        let msg = String::from_utf8(req.auth_bytes.to_vec()).unwrap();
                        let out = match mech {
                            SaslMechanism::Plain => {
                                if msg == format!("\0{USER}\0{PASSWORD}") {
                                    Ok(String::new())
                                } else {
                                    Err("Invalid username or password".to_string())
                                }
                            }
                            _ if step == 0 => scram.first(&msg),
                            _ => {
                                let (m, salt, i) = (mech, scram.salt.clone(), iterations);
                                let key = tokio::task::spawn_blocking(move || {
                                    salted(m, PASSWORD, &salt, i)
                                })
                                .await
                                .unwrap();
                                scram.last(&msg, &key)
                            }
                        };
                        step += 1;
                        let resp = match out {
                            Ok(o) => {
                                SaslAuthenticateResponse::default().with_auth_bytes(Bytes::from(o))
                            }
                            Err(e) => SaslAuthenticateResponse::default()
                                .with_error_code(58)
                                .with_error_message(Some(StrBytes::from_string(e))),
                        };
                        reply(&mut s, c, resp, version).await;
                    }
                    other => panic!("unexpected {other:?}"),
                }
            }
        });
        port
    }

    /// A broker whose OAUTHBEARER server side follows KIP-255 / RFC 7628: it keeps every
    /// SaslAuthenticate message it receives, accepts the token `good` and answers any other
    /// with the error JSON, then (after the client's `\x01`) with error 58.
    async fn oauth_broker(seen: Arc<std::sync::Mutex<Vec<Vec<u8>>>>) -> u16 {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let seen = seen.clone();
                tokio::spawn(async move {
                    while let Some(mut frame) = read_frame(&mut s).await {
                        let key = ApiKey::try_from(frame.clone().get_i16()).unwrap();
                        let version = frame.clone().slice(2..).get_i16();
                        let h =
                            RequestHeader::decode(&mut frame, key.request_header_version(version))
                                .unwrap();
                        let c = h.correlation_id;
                        match key {
                            ApiKey::ApiVersions => {
                                let keys = [(18, 0, 3), (17, 0, 1), (36, 0, 2)]
                                    .map(|(k, lo, hi)| {
                                        ApiVersion::default()
                                            .with_api_key(k)
                                            .with_min_version(lo)
                                            .with_max_version(hi)
                                    })
                                    .to_vec();
                                let r = ApiVersionsResponse::default().with_api_keys(keys);
                                reply(&mut s, c, r, version).await;
                            }
                            ApiKey::SaslHandshake => {
                                let req =
                                    SaslHandshakeRequest::decode(&mut frame, version).unwrap();
                                let ok = req.mechanism.as_str() == "OAUTHBEARER";
                                let resp = SaslHandshakeResponse::default()
                                    .with_error_code(if ok { 0 } else { 33 })
                                    .with_mechanisms(vec![StrBytes::from_static_str(
                                        "OAUTHBEARER",
                                    )]);
                                reply(&mut s, c, resp, version).await;
                            }
                            ApiKey::SaslAuthenticate => {
                                let req =
                                    SaslAuthenticateRequest::decode(&mut frame, version).unwrap();
                                let msg = req.auth_bytes.to_vec();
                                seen.lock().unwrap().push(msg.clone());
                                let resp = if msg == b"\x01" {
                                    SaslAuthenticateResponse::default()
                                        .with_error_code(58)
                                        .with_error_message(Some(StrBytes::from_static_str(
                                            "Authentication failed: invalid token",
                                        )))
                                } else if msg.windows(17).any(|w| w == b"auth=Bearer good\x01") {
                                    SaslAuthenticateResponse::default()
                                } else {
                                    SaslAuthenticateResponse::default().with_auth_bytes(
                                        Bytes::from_static(
                                            br#"{"status":"invalid_token","scope":"kafka"}"#,
                                        ),
                                    )
                                };
                                reply(&mut s, c, resp, version).await;
                            }
                            other => panic!("unexpected {other:?}"),
                        }
                    }
                });
            }
        });
        port
    }

    fn oauth_settings(port: u16, token_file: &std::path::Path) -> Arc<ConnectionSettings> {
        let mut s = ConnectionSettings::plaintext(&format!("127.0.0.1:{port}")).unwrap();
        s.security = SecurityProtocol::SaslPlaintext;
        s.sasl = Some(SaslSettings {
            mechanism: SaslMechanism::OauthBearer,
            username: String::new(),
            password: Default::default(),
            oauth: Some(crate::oauth::TokenSource::new(
                crate::oauth::OauthSettings {
                    method: crate::oauth::OauthMethod::File(token_file.to_owned()),
                    extensions: vec![
                        ("logicalCluster".into(), "lkc-123".into()),
                        ("identityPoolId".into(), "pool-9".into()),
                    ],
                },
            )),
        });
        Arc::new(s)
    }

    /// The client's message is exactly KIP-255's (GS2 header, auth=Bearer, extensions,
    /// separators), and a token the broker refuses ends with its status and error, the client
    /// having answered the error JSON with `\x01`, the token in neither.
    #[tokio::test]
    async fn oauthbearer_sends_kip_255s_message_and_handles_the_error_answer() {
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let port = oauth_broker(seen.clone()).await;
        let file = std::env::temp_dir().join(format!("kafka-io-{}-sasl-token", std::process::id()));
        std::fs::write(&file, "good\n").unwrap();
        let c = Connector::new(oauth_settings(port, &file)).unwrap();
        c.connect_any().await.expect("the good token is accepted");
        assert_eq!(
            seen.lock().unwrap().as_slice(),
            [b"n,,\x01auth=Bearer good\x01logicalCluster=lkc-123\x01identityPoolId=pool-9\x01\x01".to_vec()]
        );
        seen.lock().unwrap().clear();
        std::fs::write(&file, "bad-token-xyz\n").unwrap();
        let c = Connector::new(oauth_settings(port, &file)).unwrap();
        let e = c.connect_any().await.err().expect("must fail");
        std::fs::remove_file(&file).unwrap();
        assert!(!e.is_retryable());
        let e = e.to_string();
        assert!(
            e.contains("OAUTHBEARER")
                && e.contains("status invalid_token")
                && e.contains("Authentication failed: invalid token"),
            "{e}"
        );
        assert!(!e.contains("bad-token-xyz"), "{e}");
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 2, "{seen:?}");
        assert_eq!(seen[1], b"\x01");
    }

    /// rskafka's connections get their token from the same source, with the extensions.
    #[tokio::test]
    async fn rskafka_oauthbearer_uses_the_same_token_source() {
        let file = std::env::temp_dir().join(format!("kafka-io-{}-rsk-token", std::process::id()));
        std::fs::write(&file, "good").unwrap();
        let s = oauth_settings(1, &file);
        let cfg = super::rskafka_config(s.sasl.as_ref().unwrap());
        let rskafka::client::SaslConfig::Oauthbearer(creds) = cfg else {
            panic!("{cfg:?}");
        };
        assert_eq!(creds.bearer_kvs.len(), 2);
        assert_eq!((creds.callback)().await.unwrap(), "good");
        std::fs::remove_file(&file).unwrap();
        assert_eq!(
            s.sasl
                .as_ref()
                .unwrap()
                .oauth
                .as_ref()
                .unwrap()
                .fetched()
                .await,
            1
        );
    }

    /// A token endpoint that is down stops the connection before the broker is asked, naming
    /// the setting (at start this ends the process, as other sign-in failures do).
    #[tokio::test]
    async fn token_endpoint_down_is_named_on_connect() {
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let port = oauth_broker(seen.clone()).await;
        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut s = ConnectionSettings::plaintext(&format!("127.0.0.1:{port}")).unwrap();
        s.security = SecurityProtocol::SaslPlaintext;
        s.sasl = Some(SaslSettings {
            mechanism: SaslMechanism::OauthBearer,
            username: String::new(),
            password: Default::default(),
            oauth: Some(crate::oauth::TokenSource::new(
                crate::oauth::OauthSettings {
                    method: crate::oauth::OauthMethod::Oidc {
                        token_endpoint_url: format!("http://127.0.0.1:{closed}/token"),
                        client_id: "id".into(),
                        client_secret: "hush".into(),
                        scope: None,
                    },
                    extensions: vec![],
                },
            )),
        });
        let e = Connector::new(Arc::new(s))
            .unwrap()
            .connect_any()
            .await
            .err()
            .expect("must fail");
        assert!(
            matches!(e, Error::Token { .. }) && !e.is_retryable(),
            "{e:?}"
        );
        assert!(
            e.to_string()
                .starts_with("KAFKA_SASL_OAUTHBEARER_TOKEN_ENDPOINT_URL"),
            "{e}"
        );
        assert!(seen.lock().unwrap().is_empty());
    }

    /// What the KIP-368 broker below saw.
    #[derive(Default)]
    struct ReauthLog {
        connections: usize,
        authentications: usize,
        /// Topic names of the Metadata requests (our stand-in for records), in arrival order.
        records: Vec<String>,
        /// Requests that came after their session had expired (the broker closed on them).
        expired: usize,
        /// OAUTHBEARER tokens, one per authentication.
        tokens: Vec<String>,
    }

    /// A broker that gives every SASL session `lifetime_ms` (KIP-368) and, as a real one,
    /// closes a connection whose session has expired when the next request (other than a
    /// SASL one) arrives. PLAIN and OAUTHBEARER (any bearer token) are accepted.
    async fn reauth_broker(lifetime_ms: i64, log: Arc<std::sync::Mutex<ReauthLog>>) -> u16 {
        reauth_broker_with(lifetime_ms, log, false).await
    }

    /// The same; `refuse_reauth`: a second SaslHandshake on a connection is answered
    /// UNSUPPORTED_SASL_MECHANISM, listing the very mechanism asked for (as tansu 0.6 does).
    async fn reauth_broker_with(
        lifetime_ms: i64,
        log: Arc<std::sync::Mutex<ReauthLog>>,
        refuse_reauth: bool,
    ) -> u16 {
        use kafka_protocol::messages::{MetadataRequest, MetadataResponse};
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                log.lock().unwrap().connections += 1;
                let log = log.clone();
                tokio::spawn(async move {
                    let mut expires: Option<Instant> = None;
                    let mut mech = String::new();
                    while let Some(mut frame) = read_frame(&mut s).await {
                        let key = ApiKey::try_from(frame.clone().get_i16()).unwrap();
                        let version = frame.clone().slice(2..).get_i16();
                        let h =
                            RequestHeader::decode(&mut frame, key.request_header_version(version))
                                .unwrap();
                        let c = h.correlation_id;
                        match key {
                            ApiKey::ApiVersions => {
                                let keys = [(18, 0, 3), (17, 0, 1), (36, 0, 2), (3, 0, 12)]
                                    .map(|(k, lo, hi)| {
                                        ApiVersion::default()
                                            .with_api_key(k)
                                            .with_min_version(lo)
                                            .with_max_version(hi)
                                    })
                                    .to_vec();
                                let r = ApiVersionsResponse::default().with_api_keys(keys);
                                reply(&mut s, c, r, version).await;
                            }
                            ApiKey::SaslHandshake => {
                                let req =
                                    SaslHandshakeRequest::decode(&mut frame, version).unwrap();
                                mech = req.mechanism.to_string();
                                let mut resp = SaslHandshakeResponse::default();
                                if refuse_reauth && expires.is_some() {
                                    resp = resp
                                        .with_error_code(33)
                                        .with_mechanisms(vec![StrBytes::from_string(mech.clone())]);
                                }
                                reply(&mut s, c, resp, version).await;
                            }
                            ApiKey::SaslAuthenticate => {
                                let req =
                                    SaslAuthenticateRequest::decode(&mut frame, version).unwrap();
                                let ok = match mech.as_str() {
                                    "PLAIN" => req.auth_bytes == format!("\0{USER}\0{PASSWORD}"),
                                    _ => req.auth_bytes.starts_with(b"n,,\x01auth=Bearer "),
                                };
                                assert!(ok, "{mech}: {:?}", req.auth_bytes);
                                {
                                    let mut l = log.lock().unwrap();
                                    l.authentications += 1;
                                    if let Some(rest) =
                                        req.auth_bytes.strip_prefix(b"n,,\x01auth=Bearer ")
                                    {
                                        let end = rest.iter().position(|b| *b == 1).unwrap();
                                        l.tokens.push(String::from_utf8_lossy(&rest[..end]).into());
                                    }
                                }
                                expires = Some(
                                    Instant::now() + Duration::from_millis(lifetime_ms as u64),
                                );
                                let resp = SaslAuthenticateResponse::default()
                                    .with_session_lifetime_ms(lifetime_ms);
                                reply(&mut s, c, resp, version).await;
                            }
                            ApiKey::Metadata => {
                                if expires.is_none_or(|e| Instant::now() >= e) {
                                    log.lock().unwrap().expired += 1;
                                    return; // closes the connection
                                }
                                let req = MetadataRequest::decode(&mut frame, version).unwrap();
                                for t in req.topics.unwrap_or_default() {
                                    let name = t.name.map(|n| n.0.to_string()).unwrap_or_default();
                                    log.lock().unwrap().records.push(name);
                                }
                                reply(&mut s, c, MetadataResponse::default(), version).await;
                            }
                            other => panic!("unexpected {other:?}"),
                        }
                    }
                });
            }
        });
        port
    }

    /// KIP-368: with a 1 s session lifetime, one connection used for 3 s re-authenticates
    /// (PLAIN and OAUTHBEARER) before each session ends: the broker never closes it, and each
    /// of the 30 requests arrives exactly once, in order, on the one connection. The OAUTHBEARER
    /// token file is rotated half way: the re-authentications after it carry the new token.
    #[tokio::test]
    async fn reauthenticates_before_the_session_ends_without_losing_or_repeating_requests() {
        use kafka_protocol::messages::{
            MetadataRequest, TopicName, metadata_request::MetadataRequestTopic,
        };
        let token_file =
            std::env::temp_dir().join(format!("kafka-io-{}-reauth-token", std::process::id()));
        for mech in [SaslMechanism::Plain, SaslMechanism::OauthBearer] {
            std::fs::write(&token_file, "token-a").unwrap();
            let log = Arc::new(std::sync::Mutex::new(ReauthLog::default()));
            let port = reauth_broker(1000, log.clone()).await;
            let settings = if mech == SaslMechanism::OauthBearer {
                let mut s = ConnectionSettings::plaintext(&format!("127.0.0.1:{port}")).unwrap();
                s.security = SecurityProtocol::SaslPlaintext;
                s.sasl = Some(SaslSettings {
                    mechanism: mech,
                    username: String::new(),
                    password: Default::default(),
                    oauth: Some(crate::oauth::TokenSource::new(
                        crate::oauth::OauthSettings {
                            method: crate::oauth::OauthMethod::File(token_file.clone()),
                            extensions: vec![],
                        },
                    )),
                });
                Arc::new(s)
            } else {
                settings(port, mech, PASSWORD)
            };
            let mut conn = Connector::new(settings)
                .unwrap()
                .connect_any()
                .await
                .unwrap();
            let v = conn.version::<MetadataRequest>("Metadata", 12).unwrap();
            let sent: Vec<String> = (0..30).map(|i| format!("record-{i}")).collect();
            for (i, name) in sent.iter().enumerate() {
                if i == 15 {
                    std::fs::write(&token_file, "token-b").unwrap();
                    let f = std::fs::File::options()
                        .write(true)
                        .open(&token_file)
                        .unwrap();
                    f.set_modified(std::time::SystemTime::now() + Duration::from_secs(5))
                        .unwrap();
                }
                let req = MetadataRequest::default().with_topics(Some(vec![
                    MetadataRequestTopic::default()
                        .with_name(Some(TopicName(StrBytes::from_string(name.clone())))),
                ]));
                conn.send(req, v, "Metadata")
                    .await
                    .unwrap_or_else(|e| panic!("{mech:?} {name}: {e}"));
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let log = log.lock().unwrap();
            assert_eq!(log.expired, 0, "{mech:?}");
            assert_eq!(log.connections, 1, "{mech:?}");
            assert_eq!(log.records, sent, "{mech:?}");
            // ~3 s of 1 s sessions at 85-95%: at least 2 re-authentications.
            assert!(
                conn.reauthentications() >= 2,
                "{mech:?}: {}",
                conn.reauthentications()
            );
            assert_eq!(
                log.authentications as u64,
                1 + conn.reauthentications(),
                "{mech:?}"
            );
            if mech == SaslMechanism::OauthBearer {
                assert_eq!(log.tokens.first().map(String::as_str), Some("token-a"));
                assert_eq!(log.tokens.last().map(String::as_str), Some("token-b"));
            }
        }
        std::fs::remove_file(&token_file).unwrap();
    }

    /// A broker that refuses re-authentication (a second handshake): the request that was due
    /// fails as an I/O error (the caller reconnects), saying re-authentication was refused, not
    /// that the broker lacks the mechanism.
    #[tokio::test]
    async fn a_refused_re_authentication_says_so() {
        use kafka_protocol::messages::MetadataRequest;
        let log = Arc::new(std::sync::Mutex::new(ReauthLog::default()));
        let port = reauth_broker_with(300, log.clone(), true).await;
        let mut conn = Connector::new(settings(port, SaslMechanism::Plain, PASSWORD))
            .unwrap()
            .connect_any()
            .await
            .unwrap();
        let v = conn.version::<MetadataRequest>("Metadata", 12).unwrap();
        let mut failure = None;
        for _ in 0..20 {
            if let Err(e) = conn.send(MetadataRequest::default(), v, "Metadata").await {
                failure = Some(e);
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let e = failure.expect("no re-authentication within 1 s of 300 ms sessions");
        assert!(matches!(e, Error::Io { .. }), "{e:?}");
        let text = e.to_string();
        assert!(text.contains("SASL re-authentication"), "{text}");
        assert!(text.contains("connection is opened again"), "{text}");
        assert!(text.contains("though it offers PLAIN"), "{text}");
        assert!(!text.contains("only"), "{text}");
    }

    fn settings(port: u16, mech: SaslMechanism, password: &str) -> Arc<ConnectionSettings> {
        let mut s = ConnectionSettings::plaintext(&format!("127.0.0.1:{port}")).unwrap();
        s.security = SecurityProtocol::SaslPlaintext;
        s.sasl = Some(SaslSettings {
            mechanism: mech,
            username: USER.into(),
            password: password.into(),
            oauth: None,
        });
        Arc::new(s)
    }

    #[tokio::test]
    async fn scram_and_plain_authenticate_against_an_rfc_server() {
        for mech in [
            SaslMechanism::ScramSha256,
            SaslMechanism::ScramSha512,
            SaslMechanism::Plain,
        ] {
            let port = mock_broker(mech).await;
            let c = Connector::new(settings(port, mech, PASSWORD)).unwrap();
            c.connect_any()
                .await
                .unwrap_or_else(|e| panic!("{mech:?}: {e}"));
        }
    }

    #[tokio::test]
    async fn wrong_password_is_a_clear_error_without_the_password() {
        for mech in [
            SaslMechanism::ScramSha256,
            SaslMechanism::ScramSha512,
            SaslMechanism::Plain,
        ] {
            let port = mock_broker(mech).await;
            let c = Connector::new(settings(port, mech, "not-it")).unwrap();
            let e = c.connect_any().await.err().expect("must fail").to_string();
            assert!(
                e.contains(mech.name())
                    && e.contains("authentication failed")
                    && e.contains("the broker refused the credentials")
                    && e.contains("KAFKA_SASL_PASSWORD"),
                "names the settings to check: {e}"
            );
            assert!(!e.contains("not-it"), "{e}");
        }
    }

    #[tokio::test]
    async fn mechanism_the_broker_lacks_is_named() {
        let port = mock_broker(SaslMechanism::ScramSha512).await;
        let c = Connector::new(settings(port, SaslMechanism::ScramSha256, PASSWORD)).unwrap();
        let e = c.connect_any().await.err().expect("must fail").to_string();
        assert!(
            e.contains("SCRAM-SHA-256") && e.contains("SCRAM-SHA-512"),
            "{e}"
        );
    }

    /// A server (or anyone in the middle of SASL_PLAINTEXT) picks the PBKDF2 count: 1 makes
    /// the exchange cheap to crack offline, 4e9 would derive for hours and block the runtime.
    /// Both are refused with the count and the limits named, before any derivation (the
    /// 4e9 one would not finish otherwise); counts inside the limits still authenticate.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn scram_iteration_counts_outside_the_limits_are_refused_before_deriving() {
        for mech in [SaslMechanism::ScramSha256, SaslMechanism::ScramSha512] {
            for count in [1, 4095, 1_000_001, 4_000_000_000] {
                let port = mock_broker_with(mech, count).await;
                let c = Connector::new(settings(port, mech, PASSWORD)).unwrap();
                let attempt = tokio::spawn(async move { c.connect_any().await.err() });
                let e = tokio::time::timeout(Duration::from_secs(10), attempt)
                    .await
                    .unwrap_or_else(|_| panic!("{mech:?} i={count}: still deriving after 10 s"))
                    .unwrap()
                    .unwrap_or_else(|| panic!("{mech:?} i={count}: authenticated"));
                assert!(
                    matches!(e, Error::ScramIterations { count: c, min: 4096, max: 1_000_000, .. } if c == u64::from(count)),
                    "{e:?}"
                );
                assert!(!e.is_retryable());
                let text = e.to_string();
                assert!(
                    text.contains(mech.name())
                        && text.contains(&format!("{count} PBKDF2 iterations"))
                        && text.contains("4096 to 1000000"),
                    "{text}"
                );
            }
            for count in [4096, 10_000] {
                let port = mock_broker_with(mech, count).await;
                let c = Connector::new(settings(port, mech, PASSWORD)).unwrap();
                c.connect_any()
                    .await
                    .unwrap_or_else(|e| panic!("{mech:?} i={count}: {e}"));
            }
        }
    }

    #[test]
    fn scram_iteration_limits_are_inclusive() {
        let check = |i: &str| super::check_scram_iterations("SCRAM-SHA-256", i.as_bytes());
        assert!(check("r=abc,s=c2FsdA==,i=4096").is_ok());
        assert!(check("r=abc,s=c2FsdA==,i=1000000").is_ok());
        assert!(check("r=abc,s=c2FsdA==,i=4095").is_err());
        assert!(check("r=abc,s=c2FsdA==,i=1000001").is_err());
        assert!(
            check("r=abc,s=c2FsdA==,i=99999999999999999999").is_ok(),
            "unreadable: rsasl's"
        );
    }

    /// The key derivation runs off the runtime: on one runtime thread (kafka-infer's default)
    /// other tasks, the /live server among them, keep running while SCRAM derives.
    #[test]
    fn scram_derivation_leaves_the_runtime_thread_free() {
        // A count whose derivation takes a second or more on this build (at most 1,000,000).
        let mut count = 50_000u32;
        let took = loop {
            let t = Instant::now();
            salted(
                SaslMechanism::ScramSha256,
                PASSWORD,
                b"pinch of salt",
                count,
            );
            let took = t.elapsed();
            if took >= Duration::from_secs(1) || count >= 1_000_000 {
                break took;
            }
            count = (count * 2).min(1_000_000);
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let longest_pause = rt.block_on(async {
            let port = mock_broker_with(SaslMechanism::ScramSha256, count).await;
            let c = Connector::new(settings(port, SaslMechanism::ScramSha256, PASSWORD)).unwrap();
            let longest = Arc::new(std::sync::Mutex::new(Duration::ZERO));
            let ticker = {
                let longest = longest.clone();
                tokio::spawn(async move {
                    loop {
                        let t = Instant::now();
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        let mut l = longest.lock().unwrap();
                        *l = (*l).max(t.elapsed());
                    }
                })
            };
            c.connect_any().await.expect("authenticates");
            ticker.abort();
            *longest.lock().unwrap()
        });
        assert!(
            longest_pause < took / 2,
            "a task waited {longest_pause:?} for the runtime thread during a {count}-iteration \
             derivation ({took:?})"
        );
    }
}
